"""ViT / DeiT (models/vit.py): configurations and parameter counts, backend agreement, parity with timm and
transformers on random weights, a SAM training smoke test on digits, and argument errors."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import digits_images  # noqa: E402
from model_helpers import assert_backends_agree, assert_same_outputs, count_params  # noqa: E402

import fastattn.models as fm  # noqa: E402
from fastattn.models import create_model, from_timm, from_transformers  # noqa: E402

timm = pytest.importorskip("timm")

TINY = dict(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one intra-op thread; with the CPU shared, two threads can be ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(model, scale=0.1):
    """Random offsets on every parameter (LayerNorm weights/biases included), so a swapped or missed tensor in
    a converter shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


# ------------------------------------------------------------------------------ configurations and sizes
# Paper figures in millions: ViT paper Table 1 (ViT-B 86M, ViT-H 632M), DeiT paper Table 1 (Ti 5M, S 22M, B 86M)
# and its distilled DeiT-B (87M).  The papers quote whole millions, so we allow less than 1M of difference.
# ViT-L (paper: 307M) is left out: its Table 1 configuration sums to 304.3M, see vit_large_patch16_224.
PAPER_MILLIONS = {
    "vit_base_patch16_224": 86, "vit_huge_patch14_224": 632, "deit_tiny_patch16_224": 5,
    "deit_small_patch16_224": 22, "deit_base_patch16_224": 86, "deit_base_distilled_patch16_224": 87,
}
NAMED = ["vit_base_patch16_224", "vit_base_patch32_224", "vit_large_patch16_224", "vit_large_patch32_224",
         "vit_huge_patch14_224", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
         "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224"]


def test_named_configurations_are_registered():
    assert set(NAMED) <= set(fm.list_models("vit_*") + fm.list_models("deit_*"))


@pytest.mark.parametrize("name", NAMED)
def test_parameter_count_matches_timm_and_paper(name):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False, num_classes=1000)
    assert count_params(ours) == count_params(theirs)
    if name in PAPER_MILLIONS:
        assert abs(count_params(ours) / 1e6 - PAPER_MILLIONS[name]) < 1.0
    if name == "vit_base_patch16_224":
        assert count_params(ours) == 86_567_656
    if name == "vit_large_patch16_224":
        assert count_params(ours) == 304_326_632


def test_overrides_build_any_size():
    m = create_model("vit_base_patch16_224", img_size=(8, 12), patch_size=4, embed_dim=24, depth=2, num_heads=3,
                     num_classes=7, mlp_ratio=2.0)
    assert len(m.blocks) == 2 and m.blocks[0].attn.num_heads == 3 and m.blocks[0].mlp.fc1.out_features == 48
    assert m.pos_embed.shape == (1, 1 + 2 * 3, 24)
    assert m(torch.randn(2, 3, 8, 12)).shape == (2, 7)
    assert m.forward_features(torch.randn(2, 3, 8, 12)).shape == (2, 7, 24)
    assert m.forward_head(m.forward_features(torch.randn(2, 3, 8, 12)), pre_logits=True).shape == (2, 24)


# ------------------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backends_agree(train):
    model = create_model("vit_base_patch16_224", **TINY)
    assert_backends_agree(model, [torch.randn(2, 3, 8, 8)], train=train)


def test_backends_agree_distilled_avg_variants():
    """DeiT's distillation token (two prefix tokens, two heads) and average pooling (fc_norm): sdpa only
    (the attention call is the one checked with Triton above)."""
    x = torch.randn(2, 3, 8, 8)
    assert_backends_agree(create_model("deit_tiny_distilled_patch16_224", **TINY), [x], backends=["sdpa"])
    assert_backends_agree(create_model("vit_base_patch16_224", global_pool="avg", **TINY), [x],
                          backends=["sdpa"], train=True)


# ---------------------------------------------------------------------------------------- timm parity
@pytest.mark.parametrize("name,kwargs", [
    ("vit_base_patch16_224", {}),
    ("vit_base_patch16_224", dict(global_pool="avg")),
    ("vit_base_patch16_224", dict(num_classes=0)),
    ("vit_base_patch16_224", dict(img_size=(16, 24), qkv_bias=False, mlp_ratio=3.0)),
    ("deit_small_distilled_patch16_224", {}),
], ids=["token", "avg", "no_head", "nonsquare_noqkvbias", "distilled"])
def test_from_timm_matches(name, kwargs):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    cfg.update(kwargs)
    theirs = _perturb(timm.create_model(name, pretrained=False, **cfg)).eval()
    ours = from_timm(theirs)
    assert type(ours).__name__ == "VisionTransformer" and not ours.training
    assert ours.distilled == name.startswith("deit_small_distilled")
    x = torch.randn(2, 3, *ours.patch_embed.img_size)
    with torch.no_grad():
        assert_same_outputs(ours.forward_features(x), theirs.forward_features(x), what="forward_features")
        assert_same_outputs(ours(x), theirs(x), what="logits")


def test_from_timm_distilled_training_returns_both_heads():
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4,
                               embed_dim=32, depth=1, num_heads=2, num_classes=5)
    theirs.set_distilled_training(True)
    ours = from_timm(theirs).train()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    cls_ours, dist_ours = ours(x)
    torch.manual_seed(0)
    cls_theirs, dist_theirs = theirs(x)
    assert_same_outputs(cls_ours, cls_theirs, what="class head")
    assert_same_outputs(dist_ours, dist_theirs, what="distillation head")


@pytest.mark.parametrize("kwargs,feature", [
    (dict(reg_tokens=1), "reg_tokens"),
    (dict(init_values=1e-5), "layer scale"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(no_embed_class=True), "no_embed_class"),
    (dict(global_pool="max"), "global_pool"),
    (dict(global_pool="avg", fc_norm=False), "final norm before average pooling"),
])
def test_from_timm_rejects_features_outside_the_papers(kwargs, feature):
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                               depth=1, num_heads=2, num_classes=5, **kwargs)
    with pytest.raises(ValueError, match=feature):
        from_timm(theirs)


def test_set_input_size_matches_timm():
    theirs = _perturb(timm.create_model("vit_base_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                        embed_dim=32, depth=1, num_heads=2, num_classes=5)).eval()
    ours = from_timm(theirs)
    theirs.set_input_size(img_size=(24, 20))
    ours.set_input_size((24, 20))
    x = torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(x), what="logits after resizing the position embedding")


# ------------------------------------------------------------------------------------ transformers parity
def _hf_config(**kw):
    from transformers import ViTConfig
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
               patch_size=4, num_labels=5, attn_implementation="eager")
    cfg.update(kw)
    return ViTConfig(**cfg)  # layer_norm_eps stays at its default 1e-12 (timm uses 1e-6): a trap to cover


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_from_transformers_image_classification_matches(act):
    from transformers import ViTForImageClassification
    theirs = _perturb(ViTForImageClassification(_hf_config(hidden_act=act))).eval()
    ours = from_transformers(theirs)
    assert ours.blocks[0].norm1.eps == 1e-12 and ours.head.out_features == 5
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(pixel_values=x).logits, what="logits")


@pytest.mark.parametrize("pooler", [True, False], ids=["pooler", "no_pooler"])
def test_from_transformers_vit_model_matches(pooler):
    from transformers import ViTModel
    theirs = _perturb(ViTModel(_hf_config(qkv_bias=pooler), add_pooling_layer=pooler)).eval()
    ours = from_transformers(theirs)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = theirs(pixel_values=x)
        assert_same_outputs(ours.forward_features(x), out.last_hidden_state, what="last_hidden_state")
        if pooler:
            assert_same_outputs(ours(x), out.pooler_output, what="pooler_output")
        else:
            assert_same_outputs(ours(x), out.last_hidden_state[:, 0], what="class token")


# ---------------------------------------------------------------------------------------------- training
def test_training_with_sam_reduces_loss():
    from fastattn.optim import SAM
    torch.manual_seed(0)
    x, y = digits_images(n=512, size=8)
    # 4x4 patches of the 8x8 digits: 4 patch tokens + the class token.  (With 2x2 patches a tiny ViT -- ours or
    # timm's -- barely moves in a few dozen steps.)
    model = create_model("vit_base_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=64, depth=2,
                         num_heads=2, num_classes=10)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.03, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for step in range(60):
        idx = torch.randint(0, len(x), (64,))
        xb, yb = x[idx], y[idx]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss
        losses.append(opt.step(closure).item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


# -------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    model = create_model("vit_base_patch16_224", **TINY)
    with pytest.raises(ValueError, match="x: expected images"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="x: image size"):
        model(torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match="name: unknown model"):
        create_model("vit_base_patch17_224")
    with pytest.raises(ValueError, match="num_heads"):
        create_model("vit_base_patch16_224", embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="global_pool"):
        create_model("vit_base_patch16_224", global_pool="max")
    with pytest.raises(ValueError, match="distilled"):
        create_model("deit_tiny_distilled_patch16_224", global_pool="avg")
    with pytest.raises(ValueError, match="img_size"):
        create_model("vit_base_patch16_224", img_size=8)
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(torch.randn(1, 3, 8, 8), [1])
    with pytest.raises(TypeError, match="model: no timm converter"):
        from_timm(torch.nn.Linear(2, 2))
