"""The encoder-decoder Transformer (Vaswani et al. 2017): configurations, backends, torch.nn.Transformer parity,
incremental decoding (KV cache) and greedy / beam-search decoding on a tiny trained copy task."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastattn  # noqa: E402
import fastattn.models as fm  # noqa: E402
from fastattn.models.transformer import DecoderState, Transformer  # noqa: E402
from fastattn.nn import KVCache, MultiheadAttention  # noqa: E402
from fastattn.nn.incremental import cross_attention_step, self_attention_step  # noqa: E402
from model_helpers import assert_backends_agree, assert_same_outputs, count_params  # noqa: E402

PAD, BOS, EOS, VOCAB = 0, 1, 2, 10  # the copy task's tokens: symbols are 3..9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread avoids thread thrashing on a shared CPU (10x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides):
    args = dict(vocab_size=11, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                dim_feedforward=32, dropout=0.0, max_len=16)
    return Transformer(**{**args, **overrides})


def padded_inputs(B=2, S=5, T=4, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (B, S), generator=g)
    tgt = torch.randint(3, vocab, (B, T), generator=g)
    src_pad = torch.zeros(B, S, dtype=torch.bool)
    src_pad[0, S - 2:] = True
    tgt_pad = torch.zeros(B, T, dtype=torch.bool)
    tgt_pad[1, T - 1:] = True
    return src, tgt, src_pad, tgt_pad


# ---------------------------------------------------------------------------------------------------------
# 1. Named configurations and parameter counts
# ---------------------------------------------------------------------------------------------------------
def test_named_configs_build_with_overrides():
    assert fm.list_models("transformer_*") == ["transformer_base", "transformer_big"]
    m = fm.create_model("transformer_base", vocab_size=11, d_model=16, nhead=2, num_encoder_layers=1,
                        num_decoder_layers=2, dim_feedforward=32)
    assert isinstance(m, Transformer)
    assert len(m.encoder.layers) == 1 and len(m.decoder.layers) == 2
    assert m(torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 3))).shape == (2, 3, 11)


# Expected counts, by hand (see the comment above the configurations in models/transformer.py):
#   attention 4d^2 + 4d; FFN 2 d d_ff + d_ff + d; encoder layer adds 2 LayerNorms (4d), decoder layer
#   2 attentions + 3 LayerNorms (6d); one 37000 x d matrix shared by both embeddings and the softmax projection.
@pytest.mark.parametrize("name, d, d_ff, heads, expected, paper", [
    ("transformer_base", 512, 2048, 8, 6 * 3_152_384 + 6 * 4_204_032 + 37000 * 512, 65e6),
    ("transformer_big", 1024, 4096, 16, 6 * 12_596_224 + 6 * 16_796_672 + 37000 * 1024, 213e6),
])
def test_param_counts(name, d, d_ff, heads, expected, paper):
    with torch.device("meta"):
        ours = fm.create_model(name)
        # torch's stack of the same size, plus the one shared embedding matrix, minus torch's two final norms.
        theirs = torch.nn.Transformer(d_model=d, nhead=heads, dim_feedforward=d_ff, batch_first=True)
        learned = fm.create_model(name, pos_embed="learned", max_len=256)
    assert ours.nhead == heads and ours.decoder.layers[0].linear1.out_features == d_ff
    n = count_params(ours)
    assert n == expected
    assert n == count_params(theirs) - 2 * 2 * d + 37000 * d
    assert count_params(learned) == n + 256 * d  # Table 3 (E): a learned position table
    # The paper's Table 3: big 213M (ours +0.6%).  base 65M: the architecture as described gives 63.1M (-3.0%);
    # no one vocabulary size reproduces both figures (65M would need ~40.7k tokens, 213M ~35.8k).
    tolerance = 0.031 if name == "transformer_base" else 0.02
    assert abs(n - paper) / paper < tolerance


def test_weight_sharing():
    m = tiny()
    assert m.src_embed.weight is m.tgt_embed.weight is m.generator.weight
    m2 = tiny(tgt_vocab_size=7)
    assert m2.src_embed.weight is not m2.tgt_embed.weight and m2.tgt_embed.weight is m2.generator.weight
    assert m2(torch.randint(0, 11, (1, 4)), torch.randint(0, 7, (1, 3))).shape == (1, 3, 7)


# ---------------------------------------------------------------------------------------------------------
# 2. Backends agree (float64 reference oracle vs float32 triton / sdpa), forward and backward
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_backends_agree(train):
    assert_backends_agree(tiny(), padded_inputs(), train=train)


def test_backends_agree_learned_positions_pre_ln():
    assert_backends_agree(tiny(pos_embed="learned", norm_first=True, final_norm=True), padded_inputs()[:2])


@pytest.mark.parametrize("backend", ["reference", "triton", "sdpa"])
def test_decode_step_matches_forward_on_every_backend(backend):
    """The cached path (one query per step over the cache, causal='bottom_right') gives the full pass's logits."""
    m = tiny().eval()
    src, tgt, src_pad, _ = padded_inputs()
    with fastattn.use_backend(backend), torch.no_grad():
        full = m(src, tgt, src_key_padding_mask=src_pad)
        state = m.init_decoder_state(m.encode(src, src_pad), src_pad)
        steps = torch.cat([m.decode_step(tgt[:, i:i + 1], state) for i in range(tgt.shape[1])], dim=1)
    assert state.offset == tgt.shape[1]
    assert_same_outputs(steps, full, atol=1e-5, what=f"{backend} cached decoding")


# ---------------------------------------------------------------------------------------------------------
# 3. Parity with torch.nn.Transformer (random weights)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("batch_first, norm_first", [(False, False), (True, False), (True, True)])
def test_torch_parity(batch_first, norm_first):
    torch.manual_seed(1)
    theirs = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                  dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                  norm_first=norm_first).eval()
    ours = fm.from_torch(theirs)
    assert not ours.training and ours.decoder.norm is not None and ours.encoder.layers[0].norm_first == norm_first
    theirs_sd = {**{f"encoder.{k}": v for k, v in theirs.encoder.state_dict().items()},
                 **{f"decoder.{k}": v for k, v in theirs.decoder.state_dict().items()}}
    ours_sd = {k: v for k, v in ours.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)

    B, S, T = 3, 7, 5
    src, tgt = torch.randint(3, 37000, (B, S)), torch.randint(3, 37000, (B, T))
    src_pad = torch.zeros(B, S, dtype=torch.bool)
    src_pad[0, 5:] = True
    tgt_pad = torch.zeros(B, T, dtype=torch.bool)
    tgt_pad[1, 3:] = True
    causal = torch.ones(T, T, dtype=torch.bool).triu_(1)  # torch's convention: True = not allowed
    with torch.no_grad():
        # torch's stack on our embedded inputs (the embeddings and the generator are ours).
        src_emb, tgt_emb = ours._embed(src, ours.src_embed), ours._embed(tgt, ours.tgt_embed)
        layout = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
        expected = layout(theirs(layout(src_emb), layout(tgt_emb),
                                 tgt_mask=causal,
                                 src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                                 memory_key_padding_mask=src_pad, tgt_is_causal=True))
        for backend in ("reference", "sdpa"):
            with fastattn.use_backend(backend):
                got = ours.forward_features(src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad)
            assert_same_outputs(got, expected, atol=1e-5, what=f"{backend} stack vs torch.nn.Transformer")
            # Without key padding the decoder runs the kernels' own causal masking (torch: is_causal hint).
            with fastattn.use_backend(backend):
                got = ours.forward_features(src, tgt)
            want = layout(theirs(layout(src_emb), layout(tgt_emb),
                                 tgt_mask=causal, tgt_is_causal=True))
            assert_same_outputs(got, want, atol=1e-5, what=f"{backend} causal stack vs torch.nn.Transformer")


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_torch_converter_keeps_config_and_rejects_custom_stacks():
    theirs = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=3,
                                  dim_feedforward=24, dropout=0.2, activation="gelu", layer_norm_eps=1e-6)
    ours = fm.from_torch(theirs)
    layer = ours.decoder.layers[0]
    assert ours.training and len(ours.decoder.layers) == 3 and layer.linear1.out_features == 24
    assert layer.dropout.p == 0.2 and layer.self_attn.dropout == 0.2 and layer.norm1.eps == 1e-6
    assert layer.activation_name == "gelu"
    custom = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                  custom_encoder=torch.nn.Identity())
    with pytest.raises(TypeError, match="custom"):
        fm.from_torch(custom)


# ---------------------------------------------------------------------------------------------------------
# fastattn.nn.incremental: cached MultiheadAttention steps == the module on the whole sequence
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_incremental_mha_matches_full(batch_first):
    torch.manual_seed(2)
    E, N, L, S = 16, 2, 6, 5
    mha = MultiheadAttention(E, 4, batch_first=batch_first).eval()
    layout = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
    x, memory = torch.randn(N, L, E), torch.randn(N, S, E)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[1, 0] = True  # a padded first key: masked for every later query
    mem_pad = torch.zeros(N, S, dtype=torch.bool)
    mem_pad[0, 3:] = True
    causal = torch.ones(L, L, dtype=torch.bool).triu_(1)
    with torch.no_grad():
        want_self = layout(mha(layout(x), layout(x), layout(x), attn_mask=causal, key_padding_mask=pad,
                               need_weights=False)[0])
        want_cross = layout(mha(layout(x), layout(memory), layout(memory), key_padding_mask=mem_pad,
                                need_weights=False)[0])
        self_cache, cross_cache, got_self, got_cross = KVCache(), KVCache(), [], []
        for lo, hi in ((0, 1), (1, 4), (4, 5), (5, 6)):  # pieces of 1 and of several tokens
            got_self.append(layout(self_attention_step(mha, layout(x[:, lo:hi]), self_cache, pad[:, :hi])))
            got_cross.append(layout(cross_attention_step(mha, layout(x[:, lo:hi]), cross_cache,
                                                         layout(memory) if lo == 0 else None, mem_pad)))
    assert len(self_cache) == L and len(cross_cache) == S
    # Row 1's first query attends to no key (its only key is padding): out_proj.bias in both paths.
    assert_same_outputs(torch.cat(got_self, 1), want_self, atol=1e-5, what="self_attention_step")
    assert_same_outputs(torch.cat(got_cross, 1), want_cross, atol=1e-5, what="cross_attention_step")


@pytest.mark.parametrize("module", ["mha", "attention"])
def test_incremental_steps_backpropagate(module):
    """Gradients through several cached steps equal those of one causal pass (KVCache.append used to write the
    new keys in place into storage the earlier steps had saved for backward)."""
    from fastattn.nn import Attention
    torch.manual_seed(3)
    E, N, L = 16, 2, 7
    x = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    if module == "mha":
        layer = MultiheadAttention(E, 2, batch_first=True, dtype=torch.float64)
        causal = torch.ones(L, L, dtype=torch.bool).triu_(1)
        want = layer(x, x, x, attn_mask=causal, need_weights=False)[0]
        step = lambda piece, cache: self_attention_step(layer, piece, cache)  # noqa: E731
    else:
        layer = Attention(E, 2, qkv_bias=True, dtype=torch.float64)
        want = layer(x, causal=True)
        step = lambda piece, cache: layer(piece, causal=True, kv_cache=cache)  # noqa: E731
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()], g)
    cache = KVCache()
    got = torch.cat([step(x[:, lo:hi], cache) for lo, hi in ((0, 1), (1, 4), (4, 5), (5, 7))], 1)
    assert_same_outputs(got, want, atol=1e-12, what="steps")
    for a, b in zip(torch.autograd.grad(got, [x, *layer.parameters()], g), want_grads):
        assert_same_outputs(a, b, atol=1e-12, what="gradient")
    with torch.no_grad():  # decoding on without gradients: appends in place again, into fresh storage
        step(torch.randn(N, 1, E, dtype=torch.float64), cache)
    assert len(cache) == L + 1


def test_kv_cache_append_errors():
    cache = KVCache()
    with pytest.raises(ValueError, match="v: batch, heads and length"):
        cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"k: expected a \[B, heads, n, d\] tensor"):
        cache.append(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="head dims 5, 5 differ"):
        cache.append(torch.randn(1, 2, 1, 5), torch.randn(1, 2, 1, 5))
    with pytest.raises(ValueError, match="batch/heads"):
        cache.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))


def test_incremental_mha_errors():
    mha = MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        self_attention_step(MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True), torch.randn(1, 1, 8),
                            KVCache())
    from fastattn.nn import Attention
    with pytest.raises(TypeError, match="causal: expected True or False"):
        Attention(8, 2)(torch.randn(1, 3, 8), causal="bogus")
    with pytest.raises(TypeError, match="mha"):
        self_attention_step(torch.nn.MultiheadAttention(8, 2), torch.randn(1, 1, 8), KVCache())
    with pytest.raises(ValueError, match="x"):
        self_attention_step(mha, torch.randn(1, 1, 4), KVCache())
    with pytest.raises(ValueError, match="key_padding_mask"):
        self_attention_step(mha, torch.randn(1, 2, 8), KVCache(), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory"):
        cross_attention_step(mha, torch.randn(1, 1, 8), KVCache())
    with pytest.raises(ValueError, match="add_bias_kv"):
        self_attention_step(MultiheadAttention(8, 2, add_bias_kv=True), torch.randn(1, 1, 8), KVCache())


# ---------------------------------------------------------------------------------------------------------
# 4. Training: a copy task; then greedy and beam search copy the source, with and without the KV cache
# ---------------------------------------------------------------------------------------------------------
def copy_batch(n, generator, min_len=4, max_len=6):
    """Sources of 4..6 symbols (padded); decoder inputs ``BOS + source``; targets ``source + EOS``."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    positions = torch.arange(max_len)[None]
    src = torch.randint(3, VOCAB, (n, max_len), generator=generator).masked_fill(positions >= lengths[:, None], PAD)
    target = torch.cat([src, torch.full((n, 1), PAD)], dim=1)
    target[torch.arange(n), lengths] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), src], dim=1)
    return src, tgt_in, target


@pytest.fixture(scope="module")
def copy_model():
    """A 1+1-layer d=32 model trained 250 Adam steps on the copy task (~10 s); returns (model, losses).

    Learning rate: 20 warm-up steps to 6e-3, then linear decay (a constant rate leaves a few percent of copies
    wrong on some seeds; this schedule copies every test sequence on each of the seeds 0-3 tried)."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=VOCAB, d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                        dim_feedforward=64, dropout=0.0, max_len=16)
    steps = 250
    opt = torch.optim.Adam(model.parameters(), lr=6e-3, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.02, 1 - i / steps))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        src, tgt_in, target = copy_batch(64, g)
        logits = model(src, tgt_in, src_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt_in == PAD)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_copy_task_loss_falls(copy_model):
    _, losses = copy_model
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first and last < 0.05, (first, last)


def _expected_copy(target, width):
    """The target ids (source + EOS, PAD after) cut/padded to ``width`` columns."""
    if width <= target.shape[1]:
        return target[:, :width]
    return torch.cat([target, target.new_full((target.shape[0], width - target.shape[1]), PAD)], dim=1)


@pytest.mark.parametrize("beam_size", [None, 3])
def test_decoding_copies_source(copy_model, beam_size):
    model, _ = copy_model
    src, _, target = copy_batch(32, torch.Generator().manual_seed(123))
    kwargs = dict(max_len=10, bos_id=BOS, eos_id=EOS, src_key_padding_mask=src == PAD, pad_id=PAD)
    if beam_size is None:
        out = model.greedy_decode(src, **kwargs)
        recomputed = model.greedy_decode(src, use_cache=False, **kwargs)
    else:
        out = model.beam_search(src, beam_size, length_penalty=0.6, **kwargs)
        recomputed = model.beam_search(src, beam_size, length_penalty=0.6, use_cache=False, **kwargs)
    # Every row stops at its EOS, PAD after it; decoding stops once every row has ended (width 7 = 6 + EOS).
    assert out.shape == (32, 7)
    assert torch.equal(out, _expected_copy(target, out.shape[1]))
    assert torch.equal(out, recomputed)


@pytest.mark.parametrize("beam_size", [None, 1, 4])
def test_cache_equals_recompute_untrained(beam_size):
    """On random weights (flat distributions, long outputs) the KV-cache path picks the same tokens as
    recomputing the whole prefix each step; beam_size=1 is greedy."""
    model = Transformer(vocab_size=VOCAB, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                        dim_feedforward=64, dropout=0.0, max_len=16).eval()
    src, _, _ = copy_batch(8, torch.Generator().manual_seed(5))
    kwargs = dict(max_len=12, bos_id=BOS, eos_id=EOS, src_key_padding_mask=src == PAD, pad_id=PAD)
    if beam_size is None:
        cached, recomputed = model.greedy_decode(src, **kwargs), model.greedy_decode(src, use_cache=False, **kwargs)
    else:
        cached = model.beam_search(src, beam_size, **kwargs)
        recomputed = model.beam_search(src, beam_size, use_cache=False, **kwargs)
        if beam_size == 1:
            assert torch.equal(cached, model.greedy_decode(src, **kwargs))
    assert torch.equal(cached, recomputed)
    # After an EOS a row holds only padding.
    ended = (cached == EOS).cumsum(1) > 0
    after = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1)
    assert bool((cached[after] == PAD).all())


def test_decode_step_pre_ln_learned_positions():
    m = tiny(pos_embed="learned", norm_first=True, final_norm=True, num_decoder_layers=2).eval()
    src, tgt, src_pad, _ = padded_inputs()
    with torch.no_grad():
        full = m(src, tgt, src_key_padding_mask=src_pad)
        state = m.init_decoder_state(m.encode(src, src_pad), src_pad)
        steps = torch.cat([m.decode_step(tgt[:, :1], state), m.decode_step(tgt[:, 1:], state)], dim=1)
    assert_same_outputs(steps, full, atol=1e-5, what="cached decoding, pre-LN")


def test_decoder_state_reorder():
    model = tiny().eval()
    src, tgt, _, _ = padded_inputs(B=3)
    with torch.no_grad():
        memory = model.encode(src)
        state = model.init_decoder_state(memory)
        model.decode_step(tgt[:, :2], state)
        index = torch.tensor([2, 2, 0])
        state.reorder(index)
        got = model.decode_step(tgt[index, 2:3], state)
        want = model(src[index], tgt[index, :3])[:, 2:3]
    assert isinstance(state, DecoderState)
    assert_same_outputs(got, want, atol=1e-5, what="reordered state")


# ---------------------------------------------------------------------------------------------------------
# 5. Bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_input():
    m = tiny()
    src, tgt = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 4))
    with pytest.raises(ValueError, match="name"):
        fm.create_model("transformer_huge")
    with pytest.raises(ValueError, match="src"):
        m(src.float(), tgt)
    with pytest.raises(ValueError, match="src"):
        m(src[0], tgt)
    with pytest.raises(ValueError, match="tgt"):
        m(src, torch.full((2, 4), 11))  # id out of the vocabulary
    with pytest.raises(ValueError, match="tgt"):
        m(src, tgt[:1])  # batch mismatch
    with pytest.raises(ValueError, match="src"):
        m(torch.zeros(2, 17, dtype=torch.long), tgt)  # longer than max_len
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        m(src, tgt, src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="tgt_key_padding_mask"):
        m(src, tgt, tgt_key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="nhead"):
        tiny(nhead=3)
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="rotary")
    with pytest.raises(ValueError, match="activation"):
        tiny(activation="tanh")
    with pytest.raises(ValueError, match="max_len"):
        m.greedy_decode(src, max_len=17, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="eos_id"):
        m.greedy_decode(src, max_len=4, bos_id=1, eos_id=11)
    with pytest.raises(ValueError, match="beam_size"):
        m.beam_search(src, beam_size=0, max_len=4, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="length_penalty"):
        m.beam_search(src, beam_size=2, max_len=4, bos_id=1, eos_id=2, length_penalty=-1.0)
    with pytest.raises(TypeError, match="state"):
        m.decode_step(tgt, None)
    with pytest.raises(ValueError, match="memory"):
        m.init_decoder_state(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="model"):
        fm.from_torch(torch.nn.Linear(2, 2))
