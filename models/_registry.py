"""The model registry: named configurations (``create_model``) and converters from timm / transformers models.

A family module registers each named configuration with ``@register_model`` on a function that takes keyword
overrides and returns the model, and each converter with ``@register_converter(source, class_name)`` on a
function that takes the source model and returns the equivalent fastattn model with its weights loaded.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

_MODELS: Dict[str, Callable] = {}
_CONVERTERS: Dict[Tuple[str, str], Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register ``fn(**overrides) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def register_converter(source: str, *class_names: str) -> Callable:
    """Register ``fn(source_model) -> fastattn model`` for models of the given class names from ``source``
    (``"timm"``, ``"transformers"`` or ``"torch"``)."""
    def wrap(fn: Callable) -> Callable:
        for cls in class_names:
            key = (source, cls)
            if key in _CONVERTERS:
                raise ValueError(f"converter for {source} {cls} is registered twice")
            _CONVERTERS[key] = fn
        return fn
    return wrap


def list_models(pattern: str = "*") -> List[str]:
    """Names of the registered configurations matching the glob ``pattern``, sorted."""
    import fnmatch
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides):
    """The named configuration, with keyword ``overrides`` of its constructor arguments (any size by keyword:
    ``create_model("vit_base_patch16_224", depth=2, embed_dim=64, num_heads=2)``)."""
    if not isinstance(name, str) or name not in _MODELS:
        import difflib
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see fastattn.models.list_models()"
        raise ValueError(f"name: unknown model {name!r}{hint}")
    return _MODELS[name](**overrides)


def _convert(source: str, model, **kwargs):
    for cls in type(model).__mro__:
        fn = _CONVERTERS.get((source, cls.__name__))
        if fn is not None:
            return fn(model, **kwargs)
    known = sorted(c for s, c in _CONVERTERS if s == source)
    raise TypeError(f"model: no {source} converter for {type(model).__name__}; known: {', '.join(known)}")


def from_timm(model, **kwargs):
    """The fastattn equivalent of a timm model (same configuration, weights loaded, head included).
    ``kwargs`` go to the family's converter (e.g. ``vocab_size=`` for the encoder-decoder)."""
    return _convert("timm", model, **kwargs)


def from_transformers(model, **kwargs):
    """The fastattn equivalent of a transformers model (same configuration, weights loaded; heads included
    where the source has them, e.g. ``*ForImageClassification``, ``BertForPreTraining``)."""
    return _convert("transformers", model, **kwargs)


def from_torch(model, **kwargs):
    """The fastattn equivalent of a ``torch.nn.Transformer`` (the encoder-decoder)."""
    return _convert("torch", model, **kwargs)
