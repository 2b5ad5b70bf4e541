"""Perceiver / Perceiver IO (models/perceiver.py): named configurations and their parameter counts, backends agree,
parity with transformers' PerceiverForImageClassificationFourier, the Fourier-feature layout, weight sharing,
every input modality, a training smoke test on digits, and bad-input errors."""
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastattn  # noqa: E402
from fastattn.models import create_model, from_transformers, list_models  # noqa: E402
from fastattn.models.perceiver import (AudioInput, ImageInput, MultimodalInput, Perceiver,  # noqa: E402
                                      PointCloudInput, SpectrogramInput, VideoInput, fourier_features,
                                      grid_positions)
from model_helpers import assert_backends_agree, assert_same_outputs, count_params  # noqa: E402
from data import digits_images  # noqa: E402

# The tiniest Perceiver: 8x8 grey images (64 inputs of 1 + 2 * (2 * 2 + 1) = 11 channels), 8 latents x 16.
TINY = dict(in_chans=1, num_bands=2, max_resolution=8, num_classes=3, num_latents=8, latent_dim=16, depth=1,
            num_heads=2, num_cross_attends=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny and the test machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**kw):
    return create_model("perceiver_imagenet", **{**TINY, **kw})


# ---------------------------------------------------------------------------------------------------------------
# 1. named configurations and parameter counts
# ---------------------------------------------------------------------------------------------------------------

def _perceiver_param_formula(input_dim: int, num_classes: int, n_cross: int, N=512, D=1024, depth=6):
    """The Perceiver's parameter count by hand: latents + ``n_cross`` distinct cross-attends (qk = v = input_dim,
    MLP ratio 1) + one latent transformer (``depth`` layers, MLP ratio 1) + a linear head on the mean latent."""
    lin = lambda i, o: i * o + o  # noqa: E731
    cross = 2 * D + 2 * input_dim + lin(D, input_dim) + 2 * lin(input_dim, input_dim) + lin(input_dim, D) \
        + 2 * D + 2 * lin(D, D)
    layer = 2 * D + 3 * lin(D, D) + lin(D, D) + 2 * D + 2 * lin(D, D)
    return N * D + n_cross * cross + depth * layer + lin(D, num_classes)


def test_named_configs_and_param_counts():
    assert {"perceiver_imagenet", "perceiver_io_imagenet_fourier", "perceiver_modelnet40"} <= set(
        list_models("perceiver*"))
    with torch.device("meta"):
        imagenet = create_model("perceiver_imagenet")
        io = create_model("perceiver_io_imagenet_fourier")
        modelnet = create_model("perceiver_modelnet40")
    # Perceiver (FF), ImageNet: 44.9M in the paper; 3 RGB + 2 * (2 * 64 + 1) = 261 input channels.
    assert imagenet.input_adapter.num_channels == 261
    assert imagenet.cross_attends[0].attn.k_proj.out_features == 261  # qk channels = input width
    n = count_params(imagenet)
    assert n == _perceiver_param_formula(261, 1000, n_cross=2)
    assert abs(n - 44.9e6) / 44.9e6 < 0.005, n
    # ModelNet40: 2 cross-attends (so both sets of cross-attend weights), xyz Fourier features: 3 * 129 channels.
    assert modelnet.input_adapter.num_channels == 387 and len(modelnet.cross_attends) == 2
    assert count_params(modelnet) == _perceiver_param_formula(387, 40, n_cross=2)
    # Perceiver IO (2-D FF), ImageNet: 48.4M in the Perceiver IO paper; exactly transformers' model.
    from transformers import PerceiverConfig, PerceiverForImageClassificationFourier
    cfg = PerceiverConfig(d_latents=1024, num_latents=512, num_blocks=8, num_self_attends_per_block=6,
                          num_self_attention_heads=8, num_cross_attention_heads=1, self_attention_widening_factor=1,
                          cross_attention_widening_factor=1, num_labels=1000)
    with torch.device("meta"):
        hf = PerceiverForImageClassificationFourier(cfg)
    assert count_params(io) == count_params(hf)
    assert abs(count_params(io) - 48.4e6) / 48.4e6 < 0.005
    # any size by keyword
    m = create_model("perceiver_imagenet", **TINY)
    assert m.latents.shape == (8, 16) and len(m.transformers[0].blocks) == 1 and m.head.out_features == 3
    with fastattn.use_backend("sdpa"):
        assert create_model("perceiver_imagenet", **{**TINY, "num_classes": 0})(torch.rand(2, 1, 8, 8)).shape \
            == (2, 16)  # pooled features


# ---------------------------------------------------------------------------------------------------------------
# 2. backends agree (float64 reference oracle vs float32 triton and sdpa, forward + backward)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backends_agree_perceiver(train):
    # M = 64 inputs >> N = 8 latents; two cross-attends (the second with the shared weights) and the mean head
    model = _tiny()
    assert_backends_agree(model, [torch.rand(2, 1, 8, 8)], train=train)


def test_backends_agree_perceiver_io_query_head():
    model = _tiny(num_cross_attends=1, num_blocks=1, head_type="query")
    assert_backends_agree(model, [torch.rand(2, 1, 8, 8)])


# ---------------------------------------------------------------------------------------------------------------
# 3. parity with transformers (random weights, no download)
# ---------------------------------------------------------------------------------------------------------------

def test_fourier_features_match_transformers_layout():
    from transformers.models.perceiver.modeling_perceiver import build_linear_positions, generate_fourier_features
    pos = build_linear_positions((5, 7)).reshape(1, 35, 2)
    theirs = generate_fourier_features(pos, num_bands=3, max_resolution=(10, 12))
    ours = fourier_features(grid_positions((5, 7)), 3, (10, 12)).float()
    assert ours.shape == (35, 2 * (2 * 3 + 1))
    assert_same_outputs(ours, theirs[0], atol=1e-6, what="fourier features")


def test_parity_transformers_image_classification_fourier():
    from transformers import PerceiverConfig, PerceiverForImageClassificationFourier
    cfg = PerceiverConfig(d_latents=32, num_latents=8, num_blocks=2, num_self_attends_per_block=2,
                          num_self_attention_heads=2, num_cross_attention_heads=1, self_attention_widening_factor=2,
                          cross_attention_widening_factor=1, num_labels=5, attn_implementation="eager")
    hf = PerceiverForImageClassificationFourier(cfg).eval()
    with torch.no_grad():  # weights well away from the 0.02-scale init, so a layout slip cannot hide
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 0.3)
            if "layernorm" in name and name.endswith("weight"):
                p.add_(1.0)
    ours = from_transformers(hf).eval()
    assert isinstance(ours, Perceiver) and ours.head_type == "query"
    # Its class fixes the Fourier features at 64 bands, max resolution 224: 3 + 258 = 261 channels.
    assert ours.input_adapter.num_channels == 261 == hf.perceiver.input_preprocessor.num_channels
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        their_inputs = hf.perceiver.input_preprocessor(x)[0]
        their_latents = hf.perceiver(inputs=x).last_hidden_state
        their_logits = hf(inputs=x).logits
        # transformers computes the features in float32 (arguments up to pi * 112): ~1e-5 off the float64 ones
        assert_same_outputs(ours.input_adapter(x), their_inputs, atol=1e-4, rtol=0, what="input array")
        with fastattn.use_backend("sdpa"):
            latents = ours.forward_features(x)
            logits = ours(x)
    assert_same_outputs(latents, their_latents, atol=1e-4, rtol=1e-4, what="latents")
    assert_same_outputs(logits, their_logits, atol=1e-4, rtol=1e-4, what="logits")
    assert their_logits.abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# architecture: weight sharing schedule, input mask
# ---------------------------------------------------------------------------------------------------------------

def test_weight_sharing_equals_unshared_model_with_copied_weights():
    shared = _tiny(num_cross_attends=3, num_blocks=4)
    assert len(shared.cross_attends) == 2 and len(shared.transformers) == 1
    unshared = _tiny(num_cross_attends=3, num_blocks=4, share_weights=False)
    assert len(unshared.cross_attends) == 3 and len(unshared.transformers) == 4
    # The unshared model with the shared weights copied into place: cross-attend 0 its own, 1 and 2 the shared
    # one, every block the one latent transformer.
    unshared.latents.data.copy_(shared.latents.data)
    unshared.head.load_state_dict(shared.head.state_dict())
    for i, src in enumerate([0, 1, 1]):
        unshared.cross_attends[i].load_state_dict(shared.cross_attends[src].state_dict())
    for t in unshared.transformers:
        t.load_state_dict(shared.transformers[0].state_dict())
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad(), fastattn.use_backend("sdpa"):
        assert_same_outputs(unshared(x), shared(x), atol=1e-6)
    shared(x).sum().backward()  # the shared cross-attend is used (it gets gradients)
    assert all(p.grad is not None for p in shared.parameters())


def test_input_mask_ignores_padded_points():
    model = create_model("perceiver_modelnet40", num_bands=4, num_latents=4, latent_dim=16, depth=1, num_heads=2,
                         num_classes=5).eval()
    pts = torch.rand(1, 10, 3) * 2 - 1
    padded = torch.cat([pts, torch.rand(1, 5, 3)], dim=1)
    mask = torch.arange(15)[None] < 10
    with torch.no_grad(), fastattn.use_backend("sdpa"):
        assert_same_outputs(model(padded, input_mask=mask), model(pts), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# every input modality: shapes and backward
# ---------------------------------------------------------------------------------------------------------------

MODALITIES = {
    "image": (lambda: ImageInput(in_chans=3, num_bands=2), lambda: torch.rand(2, 3, 6, 4), 24, 3 + 2 * 5),
    "image_patches": (lambda: ImageInput(in_chans=1, num_bands=2, patch_size=2), lambda: torch.rand(2, 1, 8, 4),
                      8, 4 + 2 * 5),
    "video": (lambda: VideoInput(in_chans=1, num_bands=2, patch_size=(1, 2, 2)), lambda: torch.rand(2, 3, 1, 4, 4),
              12, 4 + 3 * 5),
    "audio": (lambda: AudioInput(samples_per_patch=8, num_bands=3), lambda: torch.randn(2, 48), 6, 8 + 7),
    "spectrogram": (lambda: SpectrogramInput(num_bands=2, max_resolution=(16, 32)), lambda: torch.rand(2, 5, 6),
                    30, 1 + 2 * 5),
    "points": (lambda: PointCloudInput(num_bands=3, max_resolution=20), lambda: torch.rand(2, 9, 3) * 2 - 1, 9, 21),
    "video+audio": (lambda: MultimodalInput({"video": VideoInput(in_chans=1, num_bands=2, patch_size=(1, 2, 2)),
                                             "audio": AudioInput(samples_per_patch=8, num_bands=3)}),
                    lambda: {"video": torch.rand(2, 2, 1, 4, 4), "audio": torch.randn(2, 32)}, 8 + 4, 19 + 2),
}


@pytest.mark.parametrize("kind", list(MODALITIES))
def test_each_modality_forward_backward(kind):
    make_adapter, make_input, num_inputs, width = MODALITIES[kind]
    adapter = make_adapter()
    x = make_input()
    assert adapter.num_channels == width
    assert adapter(x).shape == (2, num_inputs, width)
    model = Perceiver(adapter, num_classes=4, num_latents=4, latent_dim=16, num_cross_attends=2, depth=1,
                      num_heads=2)
    with fastattn.use_backend("sdpa"):
        out = model(x)
        assert out.shape == (2, 4)
        out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_multimodal_layout_and_kind_by_keyword():
    video = VideoInput(in_chans=1, num_bands=2, patch_size=(1, 2, 2))
    audio = AudioInput(samples_per_patch=8, num_bands=3)
    mm = MultimodalInput({"video": video, "audio": audio})
    x = {"video": torch.rand(2, 2, 1, 4, 4), "audio": torch.randn(2, 32)}
    arr = mm(x)
    # sorted names: audio's 4 tokens first, then video's 8; each padded with its own modality embedding
    assert torch.equal(arr[:, :4, :15], audio(x["audio"])) and torch.equal(arr[:, 4:, :19], video(x["video"]))
    assert torch.equal(arr[:, :4, 15:], mm.padding["audio"].expand(2, 4, -1))
    assert torch.equal(arr[:, 4:, 19:], mm.padding["video"].expand(2, 8, -1))
    # a modality by keyword: raw audio on the ImageNet configuration's sizes
    m = create_model("perceiver_imagenet", input_adapter="audio", samples_per_patch=16, num_bands=4,
                     num_latents=4, latent_dim=16, depth=1, num_heads=2, num_cross_attends=1)
    assert isinstance(m.input_adapter, AudioInput) and m.input_adapter.num_channels == 16 + 9


# ---------------------------------------------------------------------------------------------------------------
# 4. training smoke test
# ---------------------------------------------------------------------------------------------------------------

def test_training_smoke_digits():
    # 2x2-pixel tokens (16 inputs of 4 values + 2-D Fourier features): per-pixel tokens learn too, but sit
    # longer on the initial plateau (all latents start alike) than a quick test allows.
    torch.manual_seed(0)
    x, y = digits_images(n=256, size=8)
    model = create_model("perceiver_imagenet", in_chans=1, num_bands=4, max_resolution=8, patch_size=2,
                         num_classes=10, num_latents=16, latent_dim=48, depth=1, num_heads=4, num_cross_attends=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses, start = [], time.time()
    g = torch.Generator().manual_seed(0)
    with fastattn.use_backend("sdpa"):
        for step in range(100):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert time.time() - start < 30


# ---------------------------------------------------------------------------------------------------------------
# 5. bad input
# ---------------------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    model = _tiny()
    with pytest.raises(ValueError, match=r"x: expected images \[B, 1, H, W\]"):
        model(torch.rand(2, 3, 8, 8))  # wrong channel count
    with pytest.raises(ValueError, match="x: expected images"):
        model(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="input_mask"):
        model(torch.rand(2, 1, 8, 8), input_mask=torch.ones(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="x: .*not divisible by patch_size"):
        ImageInput(in_chans=1, patch_size=3)(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="x: 50 samples"):
        AudioInput(samples_per_patch=8)(torch.randn(1, 50))
    with pytest.raises(ValueError, match=r"x: expected point clouds \[B, N, 3\]"):
        PointCloudInput()(torch.rand(1, 10, 2))
    with pytest.raises(ValueError, match="x: expected a dict with the modalities"):
        MultimodalInput({"audio": AudioInput(samples_per_patch=8)})({"video": torch.rand(1, 8)})
    with pytest.raises(ValueError, match="name: unknown model"):
        create_model("perceiver_imagenett")
    with pytest.raises(ValueError, match="input_adapter: unknown kind"):
        create_model("perceiver_imagenet", input_adapter="smell")
    with pytest.raises(TypeError, match="samples_per_patch"):
        create_model("perceiver_imagenet", samples_per_patch=16)  # not an image adapter argument
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=3)
    with pytest.raises(ValueError, match="num_cross_attends"):
        _tiny(num_cross_attends=3, num_blocks=2)
    with pytest.raises(ValueError, match="head_type"):
        _tiny(head_type="max")
    with pytest.raises(ValueError, match="max_resolution"):
        ImageInput(max_resolution=(8, 8, 8))
