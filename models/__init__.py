"""fastattn.models: thin model definitions built on fastattn.nn (installed from the top-level models/).

    model = fastattn.models.create_model("vit_base_patch16_224", num_classes=10)
    fastattn.models.list_models("swin*")
    ours = fastattn.models.from_timm(timm_model)          # same configuration, weights loaded
    ours = fastattn.models.from_transformers(hf_model)

Each family module registers its named configurations (the papers' sizes) and its converters on import.
"""
from ._registry import create_model, from_timm, from_torch, from_transformers, list_models, register_converter, \
    register_model

# Family modules (importing them registers their configurations and converters).
from . import vit  # noqa: E402,F401  ViT, DeiT
from . import setr  # noqa: E402,F401
from . import swin  # noqa: E402,F401
from . import bert  # noqa: E402,F401
from . import transformer  # noqa: E402,F401  the encoder-decoder Transformer
from . import perceiver  # noqa: E402,F401
from . import vivit  # noqa: E402,F401
from . import timesformer  # noqa: E402,F401

__all__ = ["create_model", "list_models", "from_timm", "from_transformers", "from_torch", "register_model",
           "register_converter"]
