"""Swin Transformer (models/swin.py): named configurations and their sizes, backends agree, parity with timm's
``SwinTransformer`` and transformers' ``SwinForImageClassification`` / ``SwinModel`` on random weights (including
feature maps that are not window multiples, non-square images, and the window clamp of small stages), a short
training run on scikit-learn's digits, and bad-input errors.  Nothing is downloaded."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastattn  # noqa: E402
from fastattn import models  # noqa: E402
from fastattn.models.swin import PatchMerging, SwinTransformer, window_and_shift  # noqa: E402
from model_helpers import assert_backends_agree, assert_same_outputs, count_params, triton_device  # noqa: E402
from data import digits_images  # noqa: E402

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

# Paper (Liu et al. 2021, Table 1 / Sec. 3.3) sizes in millions of parameters, rounded to integers there.
PAPER_PARAMS_M = {
    "swin_tiny_patch4_window7_224": 28,
    "swin_small_patch4_window7_224": 50,
    "swin_base_patch4_window7_224": 88,
    "swin_large_patch4_window7_224": 197,
}
NAMED = sorted(PAPER_PARAMS_M) + ["swin_base_patch4_window12_384", "swin_large_patch4_window12_384"]


def randomize(model, table_std=0.5, std=0.1):
    """Perturbs every parameter (LayerNorm weights away from 1, transformers' zero-initialised bias tables away
    from 0) so that a wrongly mapped or permuted weight shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (table_std if "relative_position_bias_table" in name else std))
    return model


def image(img_size, batch=2, channels=3):
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return torch.randn(batch, channels, h, w)


def tiny(**overrides):
    """12x12 images, patch 2 -> a 6x6 map: stage 0 pads to 8x8 with window 4 and shift 2; stage 1 (3x3) clamps
    the window to 3 and drops the shift."""
    cfg = dict(img_size=12, patch_size=2, in_chans=3, num_classes=3, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
               window_size=4)
    return models.create_model("swin_tiny_patch4_window7_224", **{**cfg, **overrides})


# ---------------------------------------------------------------------------------------------------------
# 1. Named configurations and sizes.
# ---------------------------------------------------------------------------------------------------------
def test_named_configurations_are_registered():
    assert set(NAMED) <= set(models.list_models("swin*"))


@pytest.mark.parametrize("name", NAMED)
def test_parameter_count_matches_timm_and_paper(name):
    with torch.device("meta"):
        ours = models.create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    n = count_params(ours)
    assert n == count_params(theirs)
    if name in PAPER_PARAMS_M:  # the paper rounds to whole millions (Swin-T: 28.29M -> "28M")
        assert round(n / 1e6) == PAPER_PARAMS_M[name], n


def test_create_model_by_keyword_and_output_shapes():
    model = tiny(num_classes=5).eval()
    x = image(12)
    assert model(x).shape == (2, 5)
    feats = model.forward_features(x)
    assert feats.shape == (2, 3, 3, 32)  # NHWC, last stage, normed
    final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 6, 6), (2, 32, 3, 3)]
    torch.testing.assert_close(final, feats)
    assert [m.shape for m in model.forward_intermediates(x, indices=1, output_fmt="NHWC",
                                                         intermediates_only=True)] == [(2, 3, 3, 32)]
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    assert tiny(num_classes=0)(x).shape == (2, 32)
    blocks = [b for s in model.layers for b in s.blocks]
    assert [(b.window_size, b.shift_size) for b in blocks] == [((4, 4), (0, 0)), ((4, 4), (2, 2)),
                                                               ((3, 3), (0, 0)), ((3, 3), (0, 0))]


def test_window_and_shift_conventions():
    # timm: per axis; transformers: both shifts off once the smaller side fits in the window.
    assert window_and_shift((5, 9), (5, 5), True, "timm") == ((5, 5), (0, 2))
    assert window_and_shift((5, 9), (5, 5), True, "transformers") == ((5, 5), (0, 0))
    assert window_and_shift((3, 3), (4, 4), True, "timm") == ((3, 3), (0, 0))
    assert window_and_shift((18, 18), (7, 7), True, "transformers") == ((7, 7), (3, 3))
    assert window_and_shift((18, 18), (7, 7), False, "timm") == ((7, 7), (0, 0))


# ---------------------------------------------------------------------------------------------------------
# 2. Backends agree (float64 reference oracle vs float32 triton and sdpa, forward + all parameter grads).
# ---------------------------------------------------------------------------------------------------------
# On the device the Triton kernels run on (CUDA, or CPU under the interpreter); the fused window kernel serves
# every block here: padding 6x6 -> 8x8 with and without a shift, and the clamped 3x3 window.
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backends_agree(train):
    dev = triton_device()
    assert_backends_agree(randomize(tiny()).to(dev), [image(12).to(dev)], train=train)


def test_backends_agree_transformers_convention():
    # pad-then-roll: the shift wraps over the padded 8x8 grid.
    dev = triton_device()
    assert_backends_agree(randomize(tiny(window_convention="transformers")).to(dev), [image(12).to(dev)])


# ---------------------------------------------------------------------------------------------------------
# 3. Parity with timm and transformers on random weights.
# ---------------------------------------------------------------------------------------------------------
# (img_size, window, depths, heads): 72/patch 4 -> 18x18, 9x9, 5x5, 3x3 maps: padding to window multiples with
# a shift, odd sizes into PatchMerging, and a last stage smaller than the window (clamped).  (40, 72) -> a
# non-square 10x18 map, where the two libraries' shift rules differ on the 5x9 stage.
TIMM_CASES = [(32, 4, (2, 2), (2, 4)), (72, 4, (2, 2, 2, 2), (2, 2, 4, 4)), ((40, 72), 5, (2, 2), (2, 2))]


@pytest.mark.parametrize("img_size,window,depths,heads", TIMM_CASES, ids=["32", "72-odd", "40x72"])
def test_from_timm_same_outputs(img_size, window, depths, heads):
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size,
                               window_size=window, embed_dim=16, depths=depths, num_heads=heads, num_classes=5)
    randomize(theirs).eval()
    ours = models.from_timm(theirs)
    assert isinstance(ours, SwinTransformer) and not ours.training
    x = image(img_size)
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(x), what="logits")
        assert_same_outputs(ours.forward_features(x), theirs.forward_features(x), what="forward_features")
        for i, (a, b) in enumerate(zip(ours.forward_intermediates(x, intermediates_only=True),
                                       theirs.forward_intermediates(x, intermediates_only=True))):
            assert_same_outputs(a, b, what=f"stage {i} features")
        if img_size == 72:
            # The test can tell the conventions apart: pad-then-roll gives other outputs here.
            for stage in ours.layers:
                for block in stage.blocks:
                    block.attn.roll_before_pad = False
            assert (ours(x) - theirs(x)).abs().max() > 1e-3


def test_from_timm_state_dict_and_flags():
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                               embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=0, strict_img_size=False)
    ours = models.from_timm(theirs.eval())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert not ours.patch_embed.strict_img_size and ours.num_classes == 0
    x = image(40)  # another size: timm keeps the windows built for 32 (dynamic mask), as ours does
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(x), what="pooled features")


HF_CASES = [(32, 4, (2, 2), (2, 4)), (72, 4, (2, 2, 2), (2, 2, 4)), ((40, 72), 5, (2, 2), (2, 2))]


def hf_config(img_size, window, depths, heads, **kw):
    return transformers.SwinConfig(image_size=img_size, patch_size=4, num_channels=3, embed_dim=16, depths=depths,
                                   num_heads=heads, window_size=window, attn_implementation="eager", **kw)


@pytest.mark.parametrize("img_size,window,depths,heads", HF_CASES, ids=["32", "72-odd", "40x72"])
def test_from_transformers_classifier_same_outputs(img_size, window, depths, heads):
    theirs = transformers.SwinForImageClassification(hf_config(img_size, window, depths, heads, num_labels=5))
    randomize(theirs).eval()
    ours = models.from_transformers(theirs)
    assert ours.window_convention == "transformers"
    x = image(img_size)
    with torch.no_grad():
        out = theirs(x, output_hidden_states=True)
        assert_same_outputs(ours(x), out.logits, what="logits")
        last = ours.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        assert_same_outputs(last, out.reshaped_hidden_states[-1], what="last stage features")
        if img_size == 72:
            for stage in ours.layers:
                for block in stage.blocks:
                    block.attn.roll_before_pad = True
            assert (ours(x) - out.logits).abs().max() > 1e-3


def test_from_transformers_base_model_same_outputs():
    theirs = transformers.SwinModel(hf_config(72, 4, (2, 2, 2), (2, 2, 4), layer_norm_eps=1e-6))
    randomize(theirs).eval()
    ours = models.from_transformers(theirs)
    assert ours.num_classes == 0 and ours.norm.eps == 1e-6 and ours.patch_embed.norm.eps == 1e-5
    x = image(72)
    with torch.no_grad():
        out = theirs(x)
        feats = ours.forward_features(x)
        assert_same_outputs(feats.flatten(1, 2), out.last_hidden_state, what="last_hidden_state")
        assert_same_outputs(ours.forward_head(feats), out.pooler_output, what="pooler_output")


def test_from_transformers_rejects_a_window_larger_than_a_stage():
    # 32 / patch 4 = 8x8, then 4x4 < window 7: transformers' bias table cannot serve that stage either.
    theirs = transformers.SwinModel(hf_config(32, 7, (1, 1), (2, 2)))
    with pytest.raises(ValueError, match="window"):
        models.from_transformers(theirs)


def test_patch_merging_channel_order_matches_timm_and_transformers():
    from timm.models.swin_transformer import PatchMerging as TimmMerging
    from transformers.models.swin.modeling_swin import SwinPatchMerging
    ours, t, h = randomize(PatchMerging(8)), TimmMerging(8), SwinPatchMerging(8)
    t.load_state_dict(ours.state_dict())
    h.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 7, 8)  # odd: padded
    with torch.no_grad():
        assert_same_outputs(ours(x), t(x), what="timm PatchMerging")
        assert_same_outputs(ours(x).flatten(1, 2), h(x.flatten(1, 2), (5, 7)), what="transformers PatchMerging")


# ---------------------------------------------------------------------------------------------------------
# 4. Training smoke test: digits upsampled to 16x16, patch 2, window 4, two stages.
# ---------------------------------------------------------------------------------------------------------
def test_training_loss_falls():
    torch.manual_seed(0)
    x, y = digits_images(n=256, size=16, channels=1)
    x = (x - x.mean()) / x.std()  # Swin has no absolute position embedding; raw 0/1 digits plateau for longer
    model = models.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, in_chans=1,
                                num_classes=10, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    with fastattn.use_backend("sdpa"):
        for step in range(100):
            idx = torch.randint(0, len(y), (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


# ---------------------------------------------------------------------------------------------------------
# 5. Bad input.
# ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    model = tiny()
    with pytest.raises(ValueError, match="x: expected images"):
        model(torch.randn(1, 1, 12, 12))  # wrong channel count
    with pytest.raises(ValueError, match="x: image size"):
        model(torch.randn(1, 3, 16, 16))  # fixed image size
    with pytest.raises(ValueError, match="x: expected images"):
        model(torch.randn(3, 12, 12))
    with pytest.raises(ValueError, match="x: image size .* multiple of the patch size"):
        tiny(strict_img_size=False)(torch.randn(1, 3, 13, 12))
    with pytest.raises(ValueError, match="name: unknown model"):
        models.create_model("swin_tiny_patch4_window8_224")
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(image(12), indices=[2])


@pytest.mark.parametrize("kwargs,arg", [
    (dict(num_heads=(2,)), "num_heads"),
    (dict(num_heads=(3, 3)), "num_heads"),
    (dict(img_size=13), "img_size"),
    (dict(window_size=0), "window_size"),
    (dict(depths=()), "depths"),
    (dict(embed_dim=0), "embed_dim"),
    (dict(num_classes=-1), "num_classes"),
    (dict(window_convention="hf"), "window_convention"),
])
def test_bad_configuration_names_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tiny(**kwargs)
