"""ViViT (models/vivit.py): named configurations and parameter counts, the tubelet embedding and its 2-D
initialisations, models 1-4 against the float64 reference backend and against plain-torch composites,
transformers' ViViT loaded into model 1, a training smoke test, and bad input."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastattn  # noqa: E402
import fastattn.models as fm  # noqa: E402
from fastattn.models import vivit  # noqa: E402
from fastattn.models.layers import PatchEmbed  # noqa: E402
from data import moving_digit_clips  # noqa: E402
from model_helpers import assert_backends_agree, assert_same_outputs, count_params  # noqa: E402

NAMED = ["vivit_b_16x2_model1", "vivit_b_16x2_model2", "vivit_b_16x2_model3", "vivit_b_16x2_model4",
         "vivit_l_16x2_model1", "vivit_l_16x2_model2", "vivit_h_14x2_model1"]
MODELS = {1: "vivit_b_16x2_model1", 2: "vivit_b_16x2_model2", 3: "vivit_b_16x2_model3", 4: "vivit_b_16x2_model4"}

# Clips [B, 4, 3, 8, 8] -> a (2, 2, 2) token grid: tubelets of 2 frames x 4x4 pixels.
TINY = dict(img_size=8, num_frames=4, patch_size=4, tubelet_size=2, in_chans=3, num_classes=3, embed_dim=16,
            depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than several (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(model: int, **kw):
    extra = dict(temporal_depth=1) if model == 2 else {}
    return fm.create_model(MODELS[model], **{**TINY, **extra, **kw})


def tiny_clip(batch=2, dtype=torch.float32):
    return torch.randn(batch, TINY["num_frames"], TINY["in_chans"], TINY["img_size"], TINY["img_size"], dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# 1. Named configurations and parameter counts.
# ---------------------------------------------------------------------------------------------------------
def test_named_configurations_registered():
    assert set(NAMED) <= set(fm.list_models("vivit*"))


# The paper's Table 2 (ViViT-B, tubelet 16x2, 32 frames, 224x224, Kinetics-400 head), in millions, and our exact
# counts.  The table's 88.9 for models 1 and 4 is 88.95 truncated; the other rows are rounded.
PAPER_TABLE_2 = [
    ("vivit_b_16x2_model1", {}, 88.9, 88_954_000),
    ("vivit_b_16x2_model2", {}, 115.1, 115_062_928),
    ("vivit_b_16x2_model3", {}, 117.3, 117_319_312),
    ("vivit_b_16x2_model4", {}, 88.9, 88_952_464),
    ("vivit_b_16x2_model2", dict(temporal_depth=0), 86.7, 86_696_080),   # "Model 2: Ave. pool baseline"
]


@pytest.mark.parametrize("name,overrides,paper_millions,exact", PAPER_TABLE_2)
def test_parameter_counts_match_paper(name, overrides, paper_millions, exact):
    with torch.device("meta"):
        n = count_params(fm.create_model(name, **overrides))
    assert n == exact
    assert abs(n / 1e6 - paper_millions) <= 1e-3 * paper_millions, f"{name}: {n / 1e6:.3f}M vs {paper_millions}M"


@pytest.mark.parametrize("name", ["vivit_b_16x2_model1", "vivit_l_16x2_model1", "vivit_h_14x2_model1"])
def test_model1_counts_equal_transformers(name):
    from transformers import VivitConfig, VivitForVideoClassification
    with torch.device("meta"):
        ours = fm.create_model(name)
        p = ours.patch_embed.patch_size[0]
        cfg = VivitConfig(tubelet_size=[2, p, p], hidden_size=ours.embed_dim, num_hidden_layers=len(ours.blocks),
                          num_attention_heads=ours.blocks[0].attn.num_heads, intermediate_size=4 * ours.embed_dim,
                          num_labels=400)
        theirs = VivitForVideoClassification(cfg)
    assert count_params(ours) == count_params(theirs)


def test_sizes_by_keyword():
    with torch.device("meta"):
        m = fm.create_model("vivit_b_16x2_model3", depth=2, embed_dim=64, num_heads=4, num_frames=8, img_size=32)
    assert len(m.blocks) == 2 and m.embed_dim == 64 and m.grid_size == (4, 2, 2)


# ---------------------------------------------------------------------------------------------------------
# Tubelet embedding: uniform frame sampling, filter inflation, central frame.
# ---------------------------------------------------------------------------------------------------------
def test_uniform_frame_sampling_is_2d_patch_embedding_per_frame():
    emb3 = vivit.TubeletEmbed(img_size=8, num_frames=3, patch_size=4, tubelet_size=1, in_chans=2, embed_dim=5)
    emb2 = PatchEmbed(img_size=8, patch_size=4, in_chans=2, embed_dim=5)
    emb3.load_2d_patch_embed(emb2.proj.weight, emb2.proj.bias, method="central_frame")
    x = torch.randn(2, 3, 2, 8, 8)
    per_frame = torch.stack([emb2(x[:, t]) for t in range(3)], dim=1).flatten(1, 2)  # frame-major tokens
    assert_same_outputs(emb3(x), per_frame)


@pytest.mark.parametrize("method", ["filter_inflation", "central_frame"])
def test_tubelet_initialisation_from_2d(method):
    t = 3
    emb3 = vivit.TubeletEmbed(img_size=8, num_frames=6, patch_size=4, tubelet_size=t, in_chans=2, embed_dim=5)
    emb2 = PatchEmbed(img_size=8, patch_size=4, in_chans=2, embed_dim=5)
    emb3.load_2d_patch_embed(emb2.proj.weight, emb2.proj.bias, method=method)
    x = torch.randn(2, 6, 2, 8, 8)
    if method == "filter_inflation":
        # A clip whose tubelets repeat one frame embeds as that frame does in 2-D.
        frames = x[:, ::t]
        x = frames.repeat_interleave(t, dim=1)
    else:
        frames = x[:, t // 2::t]    # each tubelet's central frame
    expected = torch.stack([emb2(frames[:, i]) for i in range(frames.shape[1])], dim=1).flatten(1, 2)
    assert_same_outputs(emb3(x), expected)


def test_inflated_weight_values():
    w = torch.randn(4, 3, 2, 2)
    inflated = vivit.inflate_patch_embed_weight(w, 4, "filter_inflation")
    assert inflated.shape == (4, 3, 4, 2, 2) and torch.allclose(inflated.sum(2), w)
    central = vivit.inflate_patch_embed_weight(w, 4, "central_frame")
    assert torch.equal(central[:, :, 2], w) and not central[:, :, [0, 1, 3]].any()


# ---------------------------------------------------------------------------------------------------------
# 2. Backends agree; forward + backward of each model.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [1, 2, 3, 4])
def test_forward_backward(model):
    m = tiny(model)
    x = tiny_clip()
    logits = m(x)
    assert logits.shape == (2, TINY["num_classes"])
    logits.square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    tokens = m.forward_features(x)
    expected = {1: (2, 1 + 8, 16), 2: (2, 1 + 2, 16), 3: (2, 8, 16), 4: (2, 8, 16)}[model]
    assert tokens.shape == expected


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("model", [1, 2, 3, 4])
def test_backends_agree(model, train):
    m = tiny(model, num_heads=4 if model == 4 else 2)   # model 4: two heads over time, two over space
    assert_backends_agree(m, [tiny_clip(batch=1)], train=train)


# ---------------------------------------------------------------------------------------------------------
# Models 2-4 against plain-torch composites of the same weights (no public implementation to load).
# ---------------------------------------------------------------------------------------------------------
def _mha(x, qkv, proj, heads, time_heads=None, grid=None):
    """Plain multi-head self-attention over the rows of ``x`` [N, L, C] (softmax of q.k / sqrt(d)).

    With ``time_heads``/``grid`` (model 4): heads [0, time_heads) attend over time only, the others over space
    only -- written with explicit masks on the full (t h w) token grid."""
    N, L, C = x.shape
    q, k, v = qkv(x).view(N, L, 3, heads, -1).permute(2, 0, 3, 1, 4)          # [N, heads, L, d] each
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if time_heads is not None:
        T, H, W = grid
        t = torch.arange(L) // (H * W)
        s = torch.arange(L) % (H * W)
        same_place = s[:, None] == s[None, :]      # attend over time: same spatial position
        same_frame = t[:, None] == t[None, :]      # attend over space: same frame
        mask = torch.stack([same_place] * time_heads + [same_frame] * (heads - time_heads))
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return proj(out.transpose(1, 2).reshape(N, L, -1))


@torch.no_grad()
def _composite_model3(m, x):
    T, H, W = m.grid_size
    tok = m.patch_embed(x) + m.pos_embed
    B, C = tok.shape[0], tok.shape[-1]
    for blk in m.blocks:
        frames = blk.norm_space(tok).view(B * T, H * W, C)                  # space: each frame's tokens
        tok = tok + _mha(frames, blk.attn_space.qkv, blk.attn_space.proj, 2).view(B, T * H * W, C)
        tubes = blk.norm_time(tok).view(B, T, H * W, C).transpose(1, 2).reshape(B * H * W, T, C)  # time
        tok = tok + _mha(tubes, blk.attn_time.qkv, blk.attn_time.proj, 2).view(B, H * W, T, C).transpose(1, 2) \
            .reshape(B, T * H * W, C)
        tok = tok + blk.mlp(blk.norm_mlp(tok))
    return m.head(m.norm(tok).mean(1))


@torch.no_grad()
def _composite_model4(m, x):
    tok = m.patch_embed(x) + m.pos_embed
    for blk in m.blocks:
        heads = blk.attn.num_heads
        tok = tok + _mha(blk.norm1(tok), blk.attn.qkv, blk.attn.proj, heads, heads // 2, m.grid_size)
        tok = tok + blk.mlp(blk.norm2(tok))
    return m.head(m.norm(tok).mean(1))


@torch.no_grad()
def _composite_model2(m, x):
    B, frames = x.shape[0], m.grid_size[0]
    tok = m.patch_embed(x).view(B, frames, -1, m.embed_dim)
    per_frame = []
    for i in range(frames):   # the spatial encoder, one temporal index at a time
        f = torch.cat([m.cls_token.expand(B, -1, -1), tok[:, i]], dim=1) + m.pos_embed
        for blk in m.blocks:
            f = blk(f)
        per_frame.append(m.norm(f)[:, 0])
    t = torch.cat([m.temporal_cls_token.expand(B, -1, -1), torch.stack(per_frame, 1)], 1) + m.temporal_pos_embed
    for blk in m.temporal_blocks:
        t = blk(t)
    return m.head(m.temporal_norm(t)[:, 0])


@pytest.mark.parametrize("model,composite", [(2, _composite_model2), (3, _composite_model3),
                                             (4, _composite_model4)], ids=["model2", "model3", "model4"])
def test_matches_plain_torch_composite(model, composite):
    m = tiny(model, num_heads=2 if model != 4 else 4, depth=2).double().eval()
    x = tiny_clip(dtype=torch.float64)
    with torch.no_grad(), fastattn.use_backend("reference"):
        ours = m(x)
    assert_same_outputs(ours, composite(m, x), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# 3. transformers' ViViT (model 1) on random weights.
# ---------------------------------------------------------------------------------------------------------
def _hf_config(**kw):
    from transformers import VivitConfig
    base = dict(image_size=[12, 9], num_frames=4, tubelet_size=[2, 4, 3], num_channels=3, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=5,
                layer_norm_eps=1e-6, attn_implementation="eager")
    return VivitConfig(**{**base, **kw})


@torch.no_grad()
def _randomise(model):
    """Perturb every parameter (cls token, position embedding and LayerNorms included: transformers zeroes or
    unit-initialises them, which would hide mismatches)."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("hidden_act", ["gelu_fast", "gelu"])
def test_from_transformers_video_classification(hidden_act):
    from transformers import VivitForVideoClassification
    theirs = _randomise(VivitForVideoClassification(_hf_config(hidden_act=hidden_act)).eval())
    ours = fm.from_transformers(theirs)
    assert isinstance(ours, vivit.ViViT) and not ours.training and ours.head.out_features == 5
    x = torch.randn(2, 4, 3, 12, 9)
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours(x)
    assert_same_outputs(got, expected, atol=1e-5, rtol=1e-4, what="logits")


@pytest.mark.parametrize("pooler", [True, False], ids=["pooler", "no_pooler"])
def test_from_transformers_model(pooler):
    from transformers import VivitModel
    theirs = _randomise(VivitModel(_hf_config(layer_norm_eps=1e-5), add_pooling_layer=pooler).eval())
    ours = fm.from_transformers(theirs)
    x = torch.randn(2, 4, 3, 12, 9)
    with torch.no_grad():
        out = theirs(x)
        assert_same_outputs(ours.forward_features(x), out.last_hidden_state, atol=1e-5, what="last_hidden_state")
        if pooler:
            assert_same_outputs(ours(x), out.pooler_output, atol=1e-5, what="pooler_output")
        else:
            assert_same_outputs(ours(x), out.last_hidden_state[:, 0], atol=1e-5, what="cls features")


# ---------------------------------------------------------------------------------------------------------
# 4. Training smoke test: model 3 on moving digits.
# ---------------------------------------------------------------------------------------------------------
def test_training_reduces_loss():
    """A tiny model 3 fits 64 moving-digit clips (full batch).  (The cls-token models, 1 and 2, learn too, but
    need more steps from timm's small initialisation: their only path from the pixels to the head is the cls
    token's attention.)"""
    torch.manual_seed(0)
    clips, labels = moving_digit_clips(n=64, frames=4, canvas=12)
    clips = (clips - clips.mean()) / clips.std()
    model = fm.create_model("vivit_b_16x2_model3", img_size=12, num_frames=4, patch_size=4, tubelet_size=2,
                            in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(25):
        loss = F.cross_entropy(model(clips), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


# ---------------------------------------------------------------------------------------------------------
# 5. Bad input.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [1, 2])
def test_bad_clips(model):
    m = tiny(model)
    with pytest.raises(ValueError, match="^x: .*in_chans"):
        m(torch.randn(1, 4, 1, 8, 8))                 # wrong channel count
    with pytest.raises(ValueError, match="^x: .*img_size"):
        m(torch.randn(1, 4, 3, 12, 8))                # wrong image size
    with pytest.raises(ValueError, match="^x: .*num_frames"):
        m(torch.randn(1, 6, 3, 8, 8))                 # wrong clip length
    with pytest.raises(ValueError, match="^x: "):
        m(torch.randn(1, 3, 8, 8))                    # an image, not a clip
    with pytest.raises(ValueError, match="^x: "):
        m(torch.randn(1, 3, 4, 8, 8))                 # [B, C, T, H, W] instead of [B, T, C, H, W]


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="divided"), "^attention: "),
    (dict(attention="factorised_dot_product", num_heads=3, embed_dim=18), "^num_heads: .*even"),
    (dict(num_heads=3), "^num_heads: "),
    (dict(num_frames=5), "^num_frames: "),
    (dict(img_size=10), "^img_size: "),
    (dict(act_layer="gelu_erf"), "^act_layer: "),
    (dict(num_classes=-1), "^num_classes: "),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vivit.ViViT(**{**TINY, **kwargs})


def test_bad_names_and_methods():
    with pytest.raises(ValueError, match="^name: unknown model 'vivit_b_16x2_model5'"):
        fm.create_model("vivit_b_16x2_model5")
    with pytest.raises(ValueError, match="^temporal_depth: "):
        tiny(2, temporal_depth=-1)
    emb = vivit.TubeletEmbed(img_size=8, num_frames=4, patch_size=4, tubelet_size=2, in_chans=3, embed_dim=5)
    with pytest.raises(ValueError, match="^method: "):
        emb.load_2d_patch_embed(torch.randn(5, 3, 4, 4), method="mean")
    with pytest.raises(ValueError, match="^weight: "):
        emb.load_2d_patch_embed(torch.randn(5, 3, 2, 2))
