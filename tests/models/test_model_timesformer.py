"""TimeSformer (models/timesformer.py): the five attention schemes.

* named configurations and the paper's parameter counts (built on the meta device);
* backends agree (float64 reference oracle vs float32 Triton and sdpa, forward + backward) for every scheme,
  in eval and in train mode;
* parity with transformers' TimesformerModel / TimesformerForVideoClassification on random weights (divided,
  space-only, joint);
* which tokens each scheme lets interact (frame-to-frame receptive field);
* a training smoke test on moving-digit clips; bad input errors.
"""
import pytest
import torch

import fastattn
from fastattn.models import create_model, from_transformers, list_models
from fastattn.models.timesformer import ATTENTION_TYPES, TimeSformer

from data import moving_digit_clips
from model_helpers import assert_backends_agree, assert_same_outputs, count_params

transformers = pytest.importorskip("transformers")

# The paper's Table 1 (TimeSformer base, 8 x 224, Kinetics-400 head), in millions of parameters.
PAPER_PARAMS = {
    "timesformer_base_space_only_8x224": 85.9,
    "timesformer_base_joint_8x224": 85.9,
    "timesformer_base_divided_8x224": 121.4,
    "timesformer_base_local_global_8x224": 121.4,
    "timesformer_base_axial_8x224": 156.8,
}
# Configurations with a transformers equivalent: (attention_type, num_frames, image_size).
HF_EQUIVALENT = {
    "timesformer_base_space_only_8x224": ("space_only", 8, 224),
    "timesformer_base_joint_8x224": ("joint_space_time", 8, 224),
    "timesformer_base_divided_8x224": ("divided_space_time", 8, 224),
    "timesformer_hr_divided_16x448": ("divided_space_time", 16, 448),
    "timesformer_l_divided_96x224": ("divided_space_time", 96, 224),
}

# The tiniest model, for the Triton-interpreter runs: 2 frames of 2 x 2 patches.
TINY = dict(img_size=8, patch_size=4, in_chans=2, num_frames=2, num_classes=3, embed_dim=16, depth=1, num_heads=2)


def tiny(attention_type, **kw):
    return TimeSformer(**{**TINY, "attention_type": attention_type, **kw})


def hf_config(attention_type, **kw):
    cfg = dict(image_size=16, patch_size=4, num_channels=3, num_frames=3, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, attention_type=attention_type, num_labels=5,
               layer_norm_eps=1e-6)
    cfg.update(kw)
    try:
        return transformers.TimesformerConfig(attn_implementation="eager", **cfg)
    except (TypeError, ValueError):
        return transformers.TimesformerConfig(**cfg)


# ---------------------------------------------------------------------------------------------------------
# 1. Named configurations and parameter counts.
# ---------------------------------------------------------------------------------------------------------
def test_named_configurations_exist():
    names = list_models("timesformer*")
    assert set(PAPER_PARAMS) | set(HF_EQUIVALENT) <= set(names)
    m = create_model("timesformer_base_axial_8x224", **{k: v for k, v in TINY.items() if k != "num_classes"},
                     num_classes=7)
    assert isinstance(m, TimeSformer) and m.attention_type == "axial" and m.head.out_features == 7
    assert len(m.blocks) == 1 and m.embed_dim == 16


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name):
    with torch.device("meta"):
        n = count_params(create_model(name))
    paper = PAPER_PARAMS[name] * 1e6
    assert abs(n - paper) <= 0.005 * paper, f"{name}: {n / 1e6:.2f}M vs the paper's {PAPER_PARAMS[name]}M"


@pytest.mark.parametrize("name", sorted(HF_EQUIVALENT))
def test_param_count_equals_transformers(name):
    attention_type, frames, size = HF_EQUIVALENT[name]
    cfg = transformers.TimesformerConfig(attention_type=attention_type, num_frames=frames, image_size=size,
                                         num_labels=400)
    with torch.device("meta"):
        theirs = count_params(transformers.TimesformerForVideoClassification(cfg))
        ours = count_params(create_model(name))
    assert ours == theirs
    if name == "timesformer_base_divided_8x224":
        assert ours == 121_566_352


def test_initialisation_follows_official_code():
    m = tiny("divided_space_time", depth=3)
    assert m.blocks[0].attn.temporal_dense.weight.abs().sum() > 0      # the first block's temporal fc is kept
    for block in m.blocks[1:]:                                         # the others start at zero
        assert block.attn.temporal_dense.weight.abs().sum() == 0 and block.attn.temporal_dense.bias.abs().sum() == 0
    assert m.time_embed.abs().sum() == 0 and m.pos_embed.abs().sum() > 0
    axial = tiny("axial", depth=2)
    assert [name for name, s in axial.blocks[1].sublayers.items() if isinstance(s.fc, torch.nn.Linear)] == ["t", "w"]
    assert axial.blocks[1].sublayers["t"].fc.weight.abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------
# 2. Backends agree, every scheme, eval and train.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_backends_agree(attention_type, train):
    torch.manual_seed(0)
    model = tiny(attention_type)
    with torch.no_grad():  # break the zero time embedding / symmetric init so every gradient is informative
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 2, 2, 8, 8)
    assert_backends_agree(model, [x], train=train)


def test_drop_path_at_one_zeroes_the_branch():
    """timm's drop_path at p = 1 drops every sample: zeros, not 0 / 0 (a drop_path_rate of 1 gives the last block
    exactly 1)."""
    from fastattn.models.layers import drop_path
    x = torch.randn(3, 4, 5)
    assert (drop_path(x, 1.0, training=True) == 0).all()
    assert torch.equal(drop_path(x, 1.0, training=False), x)
    model = tiny("divided_space_time", depth=2, drop_path_rate=1.0).train()
    assert torch.isfinite(model(torch.randn(2, 2, 2, 8, 8))).all()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_dropout_and_drop_path_train(attention_type):
    """With every dropout and stochastic depth on, training mode is random and eval mode deterministic."""
    model = tiny(attention_type, depth=2, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.5)
    x = torch.randn(4, 2, 2, 8, 8)
    with fastattn.use_backend("sdpa"):
        a, b = model(x), model(x)
        a.sum().backward()
        assert not torch.equal(a, b)
        model.eval()
        assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------------------
# 3. Parity with transformers on random weights.
# ---------------------------------------------------------------------------------------------------------
def _random_hf(cls, attention_type, **kw):
    torch.manual_seed(0)
    hf = cls(hf_config(attention_type, **kw)).eval()
    with torch.no_grad():  # every weight random, including the zero-initialised time embeddings and biases
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_transformers_parity(attention_type):
    x = torch.randn(2, 3, 3, 16, 16)
    hf = _random_hf(transformers.TimesformerForVideoClassification, attention_type)
    ours = from_transformers(hf).eval()
    assert ours.attention_type == attention_type and ours.head.out_features == 5
    with torch.no_grad():
        assert_same_outputs(ours(x), hf(pixel_values=x).logits, atol=1e-5, what="logits")
        # The base model: all tokens, in TimeSformer's (n t) order.
        base = from_transformers(hf.timesformer).eval()
        assert isinstance(base.head, torch.nn.Identity)
        assert_same_outputs(base.forward_features(x), hf.timesformer(pixel_values=x).last_hidden_state, atol=1e-5,
                            what="last_hidden_state")


def test_transformers_parity_space_only():
    """transformers' space-only path returns every frame's tokens (and per-frame logits, [B*T, classes]); the
    official code -- and ours -- averages the frames before the norm and the head."""
    B, T = 2, 3
    x = torch.randn(B, T, 3, 16, 16)
    hf = _random_hf(transformers.TimesformerForVideoClassification, "space_only")
    ours = from_transformers(hf).eval()
    assert ours.time_embed is None
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        tokens = ours.forward_tokens(x)                                      # [B, T, 1 + N, dim]
        hidden = hf.timesformer(pixel_values=x).last_hidden_state
        assert_same_outputs(ours.norm(tokens).flatten(0, 1), hidden, atol=1e-5, what="per-frame tokens")
        assert_same_outputs(ours.head(ours.norm(tokens[:, :, 0])).flatten(0, 1), out.logits, atol=1e-5,
                            what="per-frame logits")
        # Our video-level logits: the official averaging over frames, from transformers' pre-norm encoder output.
        pre_norm = out.hidden_states[-1].view(B, T, *out.hidden_states[-1].shape[1:]).mean(1)
        official = hf.classifier(hf.timesformer.layernorm(pre_norm)[:, 0])
        assert_same_outputs(ours(x), official, atol=1e-5, what="video logits")


def test_transformers_model_parity_space_only():
    x = torch.randn(1, 3, 3, 16, 16)
    hf = _random_hf(transformers.TimesformerModel, "space_only")
    ours = from_transformers(hf).eval()
    with torch.no_grad():
        assert_same_outputs(ours.norm(ours.forward_tokens(x)).flatten(0, 1), hf(pixel_values=x).last_hidden_state,
                            atol=1e-5, what="last_hidden_state")


def test_transformers_converter_rejects_other_activations():
    hf = transformers.TimesformerModel(hf_config("divided_space_time", hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="model: hidden_act"):
        from_transformers(hf)


# ---------------------------------------------------------------------------------------------------------
# The schemes' receptive fields: which frames a patch token hears from within one block.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_frames_interact_except_space_only(attention_type):
    """A one-block model on 2 frames of 4 x 4 patches: the gradient of frame 1's top-left patch token w.r.t.
    frame 0's pixels of the bottom-right patch is zero for space-only attention and non-zero for every scheme
    that mixes frames (axial reaches it through t, then w, then h; L+G through the local block of 2 x 2 patches
    and then the global sub-layer's key at patch (2, 2) of frame 0)."""
    torch.manual_seed(0)
    model = TimeSformer(img_size=16, patch_size=4, in_chans=1, num_frames=2, num_classes=0, embed_dim=16, depth=1,
                        num_heads=2, attention_type=attention_type).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 2, 1, 16, 16, requires_grad=True)
    with fastattn.use_backend("reference"):
        tokens = model.forward_tokens(x)
    if attention_type == "space_only":
        target = tokens[0, 1, 1]                                      # frame 1, patch 0 (after the cls token)
    else:
        first = 1 if model.has_cls_token else 0
        target = tokens[0, first + 0 * 2 + 1]                          # patch 0 of frame 1: token n*T + t
    (grad,) = torch.autograd.grad(target.sum(), x)
    reach = grad[0, 0, 0, 12:, 12:].abs().sum().item()                 # frame 0, the bottom-right patch
    if attention_type == "space_only":
        assert reach == 0.0
    else:
        assert reach > 0.0


# ---------------------------------------------------------------------------------------------------------
# 4. Training smoke test.
# ---------------------------------------------------------------------------------------------------------
def test_training_smoke_divided():
    """A tiny divided model fits 64 moving-digit clips (full batch): the loss falls well within 40 steps."""
    torch.manual_seed(0)
    clips, labels = moving_digit_clips(n=64, frames=4, canvas=12)
    model = create_model("timesformer_base_divided_8x224", img_size=12, patch_size=4, in_chans=1, num_frames=4,
                         num_classes=10, embed_dim=32, depth=1, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(clips), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


# ---------------------------------------------------------------------------------------------------------
# 5. Bad input.
# ---------------------------------------------------------------------------------------------------------
def test_bad_input():
    model = tiny("divided_space_time")
    with pytest.raises(ValueError, match=r"x: 3 channels.*in_chans=2"):
        model(torch.randn(1, 2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x: frame size \(8, 12\).*img_size"):
        model(torch.randn(1, 2, 2, 8, 12))
    with pytest.raises(ValueError, match=r"x: 3 frames.*num_frames=2"):
        model(torch.randn(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected clips \[B, T, C, H, W\]"):
        model(torch.randn(2, 2, 8, 8))
    with pytest.raises(TypeError, match="x: expected a tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="name: unknown model"):
        create_model("timesformer_base_divided_8x225")
    with pytest.raises(ValueError, match="attention_type"):
        tiny("space_time")
    with pytest.raises(ValueError, match="num_heads"):
        tiny("axial", embed_dim=18, num_heads=4)
    with pytest.raises(ValueError, match="num_frames"):
        tiny("joint_space_time", num_frames=0)
