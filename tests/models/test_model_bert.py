"""BERT (models/bert.py): named configurations and their sizes, backends agree (with padding), parity with
transformers' BertForPreTraining / BertModel / BertForMaskedLM on random weights, a masked-LM training smoke
test on character tokens, and input errors."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastattn.models as fm  # noqa: E402
from fastattn.models.bert import Bert  # noqa: E402
from model_helpers import assert_backends_agree, assert_same_outputs, count_params  # noqa: E402
import data  # noqa: E402

transformers = pytest.importorskip("transformers")

PAD, CLS, SEP, MASK = 0, 1, 2, 3  # data.char_tokens leaves ids 0..3 free for these

TINY = dict(vocab_size=40, embed_dim=16, depth=1, num_heads=2, max_position_embeddings=16)


def _hf_config(**kw):
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=16, type_vocab_size=2, attn_implementation="eager")
    return transformers.BertConfig(**{**base, **kw})


def _randomize_(model, std=0.5):
    """Every parameter random (biases, LayerNorms and the MLM bias too, which init leaves at 0/1), so a
    mis-mapped weight cannot hide; the tied decoder follows the word embeddings."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def _batch(B=3, L=9, vocab=50, seed=0):
    """ids, token types (sentence A then B) and a padding mask: row 0 full, row 1 and row 2 padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, L), generator=g)
    ids[:, 0] = CLS
    types = (torch.arange(L) >= L // 2).long().expand(B, L).clone()
    mask = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        mask[1, L - 3:] = 0
    if B > 2:
        mask[2, 3:] = 0
    ids[mask == 0] = PAD
    types[mask == 0] = 0
    return ids, types, mask


# ---------------------------------------------------------------------------------------------------------------
# 1. Named configurations and their sizes

def _hf_sizes(hidden, layers, heads):
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=4 * hidden)
    with torch.device("meta"):
        return (count_params(transformers.BertForPreTraining(cfg)),
                count_params(transformers.BertModel(cfg)))


@pytest.mark.parametrize("name, hidden, layers, heads, paper", [
    ("bert_base_uncased", 768, 12, 12, 110e6),
    ("bert_large_uncased", 1024, 24, 16, 340e6),
])
def test_named_config_sizes(name, hidden, layers, heads, paper):
    assert name in fm.list_models("bert*")
    with torch.device("meta"):
        model = fm.create_model(name)
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (hidden, layers, heads)
    total = count_params(model)
    encoder = total - count_params(model.mlm_head) - count_params(model.nsp_head)  # BertModel: with the pooler
    hf_pretraining, hf_model = _hf_sizes(hidden, layers, heads)
    assert total == hf_pretraining
    assert encoder == hf_model
    # The paper's 110M / 340M are BertModel's 109.5M / 335.1M rounded (loosely for large).
    assert abs(encoder - paper) / paper < (0.005 if name == "bert_base_uncased" else 0.015)


def test_create_model_overrides():
    model = fm.create_model("bert_base_uncased", depth=2, embed_dim=32, num_heads=4, vocab_size=60)
    assert isinstance(model, Bert) and len(model.blocks) == 2
    assert model.blocks[0].mlp.fc1.out_features == 128  # 4H
    out = model.eval()(torch.randint(0, 60, (2, 5)))
    assert out.mlm_logits.shape == (2, 5, 60) and out.nsp_logits.shape == (2, 2)
    seq, pooled = model.forward_features(torch.randint(0, 60, (2, 5)))
    assert seq.shape == (2, 5, 32) and pooled.shape == (2, 32)


def test_decoder_tied_to_word_embeddings():
    """The MLM decoder is the word-embedding matrix itself: its gradient collects both uses."""
    model = Bert(**TINY).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names)
    ids = torch.randint(4, 40, (2, 6))
    logits = model(ids).mlm_logits
    emb = model.embeddings.word_embeddings.weight
    seq, _ = model.forward_features(ids)
    expected = F.linear(model.mlm_head.norm(model.mlm_head.act(model.mlm_head.fc(seq))), emb, model.mlm_head.bias)
    torch.testing.assert_close(logits, expected)


# ---------------------------------------------------------------------------------------------------------------
# 2. Backends agree (float64 reference oracle vs float32 triton / sdpa), with a padding mask

def _both_heads_loss(out):
    """Weights every MLM and NSP logit differently, so every parameter (pooler and NSP head too) gets a grad."""
    w1 = torch.linspace(-1.0, 1.0, out.mlm_logits.numel(), dtype=out.mlm_logits.dtype).view_as(out.mlm_logits)
    w2 = torch.linspace(-1.0, 1.0, out.nsp_logits.numel(), dtype=out.nsp_logits.dtype).view_as(out.nsp_logits)
    return (out.mlm_logits * w1).sum() + (out.nsp_logits * w2).sum()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backends_agree_with_padding(train):
    model = Bert(**TINY, drop_rate=0.0, attn_drop_rate=0.0)
    _randomize_(model, std=0.3)
    ids, types, mask = _batch(B=3, L=7, vocab=40)
    assert_backends_agree(model, (ids, types, mask), loss_fn=_both_heads_loss, train=train)


# ---------------------------------------------------------------------------------------------------------------
# 3. Parity with transformers (random weights, eager attention)

@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_parity_bert_for_pretraining(hidden_act):
    hf = _randomize_(transformers.BertForPreTraining(_hf_config(hidden_act=hidden_act))).eval()
    ours = fm.from_transformers(hf)
    assert isinstance(ours, Bert) and not ours.training
    assert count_params(ours) == count_params(hf)
    ids, types, mask = _batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        out = ours(ids, types, mask)
        seq, pooled = ours.forward_features(ids, types, mask)
        base = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
        # No token types / no mask: transformers' defaults (all type 0, no padding).
        theirs_plain, out_plain = hf(input_ids=ids), ours(ids)
    assert_same_outputs(out.mlm_logits, theirs.prediction_logits, atol=1e-4, what="prediction_logits")
    assert_same_outputs(out.nsp_logits, theirs.seq_relationship_logits, atol=1e-4, what="seq_relationship_logits")
    assert_same_outputs(seq, base.last_hidden_state, atol=1e-5, what="last_hidden_state")
    assert_same_outputs(pooled, base.pooler_output, atol=1e-5, what="pooler_output")
    assert_same_outputs(out_plain.mlm_logits, theirs_plain.prediction_logits, atol=1e-4, what="unmasked logits")


def test_parity_bert_model_and_masked_lm():
    ids, types, mask = _batch()
    hf_base = _randomize_(transformers.BertModel(_hf_config())).eval()
    ours = fm.from_transformers(hf_base)
    with torch.no_grad():
        theirs = hf_base(input_ids=ids, token_type_ids=types, attention_mask=mask)
        seq, pooled = ours.forward_features(ids, types, mask)
    assert_same_outputs(seq, theirs.last_hidden_state, what="BertModel last_hidden_state")
    assert_same_outputs(pooled, theirs.pooler_output, what="BertModel pooler_output")

    hf_mlm = _randomize_(transformers.BertForMaskedLM(_hf_config(pad_token_id=1))).eval()
    ours = fm.from_transformers(hf_mlm)
    assert ours.embeddings.word_embeddings.padding_idx == 1
    with torch.no_grad():
        theirs = hf_mlm(input_ids=ids, token_type_ids=types, attention_mask=mask)
        out = ours(ids, types, mask)
    assert_same_outputs(out.mlm_logits, theirs.logits, atol=1e-4, what="BertForMaskedLM logits")


def test_converter_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="hidden_act"):
        fm.from_transformers(transformers.BertModel(_hf_config(hidden_act="silu")))
    with pytest.raises(ValueError, match="decoder"):
        fm.from_transformers(transformers.BertModel(_hf_config(is_decoder=True)))
    with pytest.raises(ValueError, match="tied"):
        fm.from_transformers(transformers.BertForMaskedLM(_hf_config(tie_word_embeddings=False)))
    with pytest.raises(TypeError, match="model"):
        fm.from_transformers(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------------
# 4. Training smoke test: masked-LM on character tokens of scikit-learn's bundled text

def _mask_tokens(x, p, generator=None):
    """BERT's masking, simplified: each token but [CLS] chosen with probability ``p`` and replaced by [MASK]
    (no 80/10/10 split); labels are the chosen tokens' ids and -100 (ignored) elsewhere."""
    chosen = torch.rand(x.shape, generator=generator) < p
    chosen[:, 0] = False
    chosen[0, 1] = True  # never an empty loss
    return x.masked_fill(chosen, MASK), x.masked_fill(~chosen, -100)


def test_masked_lm_training_loss_falls():
    """A tiny BERT learns masked-LM on character windows of scikit-learn's bundled text: the held-out masked-LM
    loss falls from the untrained model's (about ln(vocab) = 4.6 nats) to the level of the corpus' character
    frequencies (3.4 nats).  Going further (using the context) takes hundreds of steps: too slow here."""
    torch.manual_seed(0)
    seq_len, steps, batch = 16, 80, 64
    ids, vocab = data.char_tokens(data.text_corpus(), seq_len - 1, n=steps * batch + 256, seed=0)
    ids = torch.cat([torch.full((len(ids), 1), CLS), ids], dim=1)  # [CLS] + 15 characters
    held_inputs, held_labels = _mask_tokens(ids[-256:], 0.15, torch.Generator().manual_seed(1))
    model = Bert(vocab_size=vocab, embed_dim=32, depth=2, num_heads=2, max_position_embeddings=seq_len,
                 drop_rate=0.0, attn_drop_rate=0.0)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            logits = model(held_inputs).mlm_logits
        model.train()
        return F.cross_entropy(logits.reshape(-1, vocab), held_labels.reshape(-1), ignore_index=-100).item()

    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))  # post-LN wants one
    initial = held_out_loss()
    for step in range(steps):
        inputs, labels = _mask_tokens(ids[step * batch:(step + 1) * batch], 0.15)
        logits = model(inputs).mlm_logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
    final = held_out_loss()
    # Seeds 0..3 give ratios 0.750..0.756 (the character-frequency level); 0.78 leaves room for noise.
    assert final < 0.78 * initial, f"held-out masked-LM loss did not fall enough: {initial:.3f} -> {final:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad input

def test_bad_input_names_the_argument():
    model = Bert(**TINY).eval()
    ids = torch.randint(4, 40, (2, 5))
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(4, 40, (1, 17)))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"input_ids: ids must lie in \[0, "):
        model(ids + 1000)
    with pytest.raises(ValueError, match="token_type_ids: ids must lie"):
        model(ids, token_type_ids=torch.full((2, 5), 7))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="name"):
        fm.create_model("bert_huge_uncased")
    with pytest.raises(ValueError, match="num_heads"):
        Bert(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="pad_token_id"):
        Bert(**{**TINY, "pad_token_id": 40})


def test_attention_mask_ignores_padding():
    """Changing padded tokens does not change the outputs at the real tokens (bool or 0/1 mask alike)."""
    model = Bert(**TINY).eval()
    ids, types, mask = _batch(B=2, L=8, vocab=40)
    other = ids.clone()
    other[mask == 0] = 17
    with torch.no_grad():
        a = model(ids, types, mask).mlm_logits
        b = model(other, types, mask.bool()).mlm_logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep])
