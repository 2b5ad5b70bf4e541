"""SETR (models/setr.py): configurations and parameter counts, decoder shapes, backend agreement, the encoder
against timm's ViT, a segmentation training smoke test on digits, and argument errors."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import digits_images  # noqa: E402
from model_helpers import assert_backends_agree, assert_same_outputs, count_params  # noqa: E402

import fastattn.models as fm  # noqa: E402
from fastattn.models import create_model, from_timm  # noqa: E402
from fastattn.models.setr import mla_layers  # noqa: E402

timm = pytest.importorskip("timm")

DECODERS = ["naive", "pup", "mla"]


def tiny(decoder, **kw):
    """A tiny SETR: 16x16 images, 4x4 patches (4x4 grid), width 16; MLA needs 4 blocks to tap."""
    cfg = dict(img_size=16, patch_size=4, embed_dim=16, depth=4 if decoder == "mla" else 1, num_heads=2,
               num_classes=3, decoder_channels=8)
    cfg.update(kw)
    return create_model(f"setr_{decoder}_base", **cfg)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one intra-op thread; with the CPU shared, two threads can be ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ configurations and sizes
NAMED = [f"setr_{d}_{s}" for d in DECODERS for s in ("base", "large")]


def test_named_configurations_are_registered():
    assert set(NAMED) <= set(fm.list_models("setr_*"))


def _decoder_params(decoder, E, C, K, patch=16):
    """Closed-form decoder sizes from the architecture (E: width, C: decoder channels, K: classes); a BN layer
    has 2 parameters per channel, a LayerNorm 2 per feature."""
    if decoder == "naive":  # LN, 1x1 conv + BN, 1x1 classifier
        return 2 * E + (E * C + C + 2 * C) + (C * K + K)
    if decoder == "pup":  # LN, log2(patch) 3x3 conv + BN stages, 1x1 classifier
        n = patch.bit_length() - 1
        return 2 * E + (E * C * 9 + 3 * C) + (n - 1) * (C * C * 9 + 3 * C) + (C * K + K)
    h = C // 2  # MLA, 4 streams: LN, 1x1 conv + BN, 3x3 conv + BN, two 3x3 convs + BN (to C/2); 3x3 classifier
    return 4 * (2 * E + (E * C + 2 * C) + (C * C * 9 + 2 * C) + (C * h * 9 + 2 * h) + (h * h * 9 + 2 * h)) \
        + (4 * h * K * 9 + K)


@pytest.mark.parametrize("name", NAMED)
def test_parameter_count(name):
    """Encoder: exactly the paper's T-Base / T-Large, i.e. timm's ViT-B/16 / ViT-L/16 at 768x768 without
    head and final norm (the decoders normalise); decoder: the closed form of its architecture.  (The paper's
    Table 2 #Params could not be checked offline; see the report.)"""
    _, decoder, size = name.split("_")
    with torch.device("meta"):
        ours = create_model(name)
        vit = timm.create_model(f"vit_{size}_patch16_224", pretrained=False, img_size=768, num_classes=0,
                                final_norm=False)
    E = {"base": 768, "large": 1024}[size]
    assert count_params(ours.encoder) == count_params(vit)
    assert count_params(ours.decoder) == _decoder_params(decoder, E, 256, 19)
    assert count_params(ours) == count_params(vit) + _decoder_params(decoder, E, 256, 19)
    if name == "setr_naive_large":
        assert count_params(ours) == 305_728_019


def test_mla_taps_evenly_spaced_layers():
    assert mla_layers(24) == [5, 11, 17, 23] and mla_layers(12) == [2, 5, 8, 11]
    with torch.device("meta"):
        assert create_model("setr_mla_large").tap_layers == [5, 11, 17, 23]
        assert create_model("setr_pup_large").tap_layers == [23]


@pytest.mark.parametrize("decoder", DECODERS)
def test_output_is_a_class_map_of_the_image_size(decoder):
    model = tiny(decoder, img_size=(16, 24)).eval()
    x = torch.randn(2, 3, 16, 24)
    feats = model.forward_features(x)
    assert len(feats) == (4 if decoder == "mla" else 1) and feats[0].shape == (2, 4 * 6, 16)
    assert model(x).shape == (2, 3, 16, 24)


# ------------------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_backends_agree(decoder, train):
    # One image of 4x4 patches: batch norm (train mode) normalises over 16 positions.  On a 2x2 grid (4 positions)
    # BN amplifies float32 rounding enough that the tolerance rule becomes a coin toss.
    assert_backends_agree(tiny(decoder), [torch.randn(1, 3, 16, 16)], train=train)


# ------------------------------------------------------------------------------- encoder against timm
def test_encoder_loaded_from_timm_vit():
    """``load_encoder`` with a timm ViT of the same grid gives timm's block outputs; on another grid the
    position embedding is resampled like timm's ``set_input_size``."""
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
                            depth=2, num_heads=2, num_classes=5).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = create_model("setr_naive_base", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                         num_classes=3, decoder_channels=8).eval()
    model.load_encoder(from_timm(vit))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        theirs = vit.blocks(vit._pos_embed(vit.patch_embed(x)))[:, 1:]
        assert_same_outputs(model.forward_features(x)[-1], theirs, what="encoder tokens")

    big = create_model("setr_naive_base", img_size=24, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                       num_classes=3, decoder_channels=8)
    big.load_encoder(from_timm(vit))
    vit.set_input_size(img_size=(24, 24))
    assert_same_outputs(big.encoder.pos_embed, vit.pos_embed, what="resampled position embedding")


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("decoder", DECODERS)
def test_training_reduces_loss(decoder):
    """Segment the digits' ink: pixel class 1 where the (16x16, upsampled) digit is brighter than 0.5."""
    torch.manual_seed(0)
    x, _ = digits_images(n=256, size=16)
    target = (x[:, 0] > 0.5).long()
    model = tiny(decoder, in_chans=1, embed_dim=32, num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


# -------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    model = tiny("naive")
    with pytest.raises(ValueError, match="x: expected images"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="x: image size"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="name: unknown model"):
        create_model("setr_fpn_large")
    with pytest.raises(ValueError, match="decoder"):
        fm.setr.SETR(decoder="fpn")
    with pytest.raises(ValueError, match="patch_size"):
        tiny("pup", img_size=12, patch_size=6)
    with pytest.raises(ValueError, match="depth"):
        tiny("mla", depth=2)
    with pytest.raises(ValueError, match="num_classes"):
        tiny("naive", num_classes=0)
    with pytest.raises(TypeError, match="vit"):
        model.load_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="vit"):
        model.load_encoder(create_model("vit_base_patch16_224", img_size=8, patch_size=4, embed_dim=32,
                                        depth=1, num_heads=2))
