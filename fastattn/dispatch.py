"""Backend selection.

Priority per device (the first backend with no reasons serves the call):

    cuda: triton > cuda > sdpa > reference
    cpu:  cpu > sdpa > reference > triton   (triton runs on CPU only under TRITON_INTERPRET=1: for tests)

bfloat16 on CPUs with AMX (where torch's SDPA multiplies on the tile unit through oneDNN) follows the same order:
our kernels run their products on AMX too (csrc/cpu/amx_forward.h, amx_backward.h) and win or tie everywhere
measured -- forward+backward 1.4-2.8x SDPA's, the forward 0.95-1.21x on dense self-attention (the one loss: 4-5 %
on long non-causal rows with head dims 64-128), 2.1-2.4x at Perceiver's head dim 261, 1.38x for GQA decoding, and
the space-time ops 1.2-1.7x the permute composites that SDPA serves (bench/NOTES.md entries 36-41).  Until entry
41, bf16 inference there tried SDPA first.

The user narrows the choice, in order of precedence, with the ``backend=`` argument, the
``fastattn.use_backend(...)`` context manager, or the ``FASTATTN_BACKEND`` environment variable (a name or
a comma-separated list, e.g. ``FASTATTN_BACKEND=triton,sdpa``).  Dispatch never falls back to a backend
the user excluded: when none of the allowed backends can serve, it raises a ``RuntimeError`` listing every
backend's reasons.  ``fastattn.explain(...)`` returns the same decision as text.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .backends import BACKENDS
from .problem import AttentionProblem

_PRIORITY = {
    "cuda": ("triton", "cuda", "sdpa", "reference"),
    "cpu": ("cpu", "sdpa", "reference", "triton"),
}
_DEFAULT_PRIORITY = ("sdpa", "reference", "triton", "cuda", "cpu")

_state = threading.local()


def _parse(names: Union[str, Sequence[str], None], source: str) -> Optional[Tuple[str, ...]]:
    if names is None:
        return None
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    elif not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{source}: expected a backend name, a comma-separated string or a list of names "
                        f"(each one of {sorted(BACKENDS)}), got {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{source}: expected at least one backend name, one of {sorted(BACKENDS)}")
    for n in names:
        if n not in BACKENDS:
            raise ValueError(f"{source}: unknown backend {n!r}; expected one of {sorted(BACKENDS)}")
    return names


@contextlib.contextmanager
def use_backend(*names: str):
    """Restrict fastattn ops inside the block to these backends (in the given order of preference).

    >>> with fastattn.use_backend("triton"):
    ...     out = fastattn.attention(q, k, v)
    """
    if len(names) == 1 and not isinstance(names[0], str):
        names = tuple(names[0])
    allowed = _parse(names, "use_backend")
    previous = getattr(_state, "allowed", None)
    _state.allowed = allowed
    try:
        yield
    finally:
        _state.allowed = previous


def _allowed(backend_arg) -> Tuple[Optional[Tuple[str, ...]], str]:
    if backend_arg is not None:
        return _parse(backend_arg, "backend"), "the backend= argument"
    ctx = getattr(_state, "allowed", None)
    if ctx is not None:
        return ctx, "fastattn.use_backend(...)"
    env = os.environ.get("FASTATTN_BACKEND")
    if env:
        return _parse(env, "FASTATTN_BACKEND"), "the FASTATTN_BACKEND environment variable"
    return None, ""


def _order(p: AttentionProblem, backend_arg=None) -> Tuple[Tuple[str, ...], str]:
    allowed, source = _allowed(backend_arg)
    if allowed is not None:
        return allowed, source
    return _PRIORITY.get(p.device.type, _DEFAULT_PRIORITY), source


def candidates(p: AttentionProblem, backend_arg=None) -> Tuple[List[Tuple[str, List[str]]], str]:
    """[(name, reasons)] in the order dispatch tries them, and who restricted the choice (or '')."""
    order, source = _order(p, backend_arg)
    return [(name, BACKENDS[name].reasons(p)) for name in order], source


def select(p: AttentionProblem, backend_arg=None):
    """The first backend in order that can serve p.  Only the backends up to it are asked (a call pays for the
    reasons of the backends ahead of the chosen one, not all of them); all are asked to build the error."""
    order, source = _order(p, backend_arg)
    for name in order:
        if not BACKENDS[name].reasons(p):
            return BACKENDS[name]
    raise RuntimeError(_no_backend_message(p, [(name, BACKENDS[name].reasons(p)) for name in order], source))


def _describe(p: AttentionProblem) -> str:
    mask = "none" if p.mask is None else f"{p.mask_kind} {tuple(p.mask.shape)}" + (
        " requires_grad" if p.mask_needs_grad else "")
    return (f"q {tuple(p.q.shape)} k {tuple(p.k.shape)} v {tuple(p.v.shape)} {p.dtype} on {p.device}, "
            f"causal={p.causal}, mask={mask}, dropout_p={p.dropout_p}, return_lse={p.return_lse}")


def _no_backend_message(p, tried, source) -> str:
    lines = [f"fastattn: no backend can serve {_describe(p)}"]
    if source:
        lines[0] += f" (the choice was restricted by {source})"
    for name, reasons in tried:
        lines.append(f"  {name}: " + "; ".join(reasons))
    return "\n".join(lines)


def explain_problem(p: AttentionProblem, backend_arg=None) -> str:
    tried, source = candidates(p, backend_arg)
    chosen = next((name for name, reasons in tried if not reasons), None)
    lines = [f"inputs: {_describe(p)}"]
    if source:
        lines.append(f"allowed backends restricted by {source}: {', '.join(n for n, _ in tried)}")
    if chosen is None:
        lines.append("chosen: none (calling the op would raise)")
    else:
        lines.append(f"chosen: {chosen}")
        plan = getattr(BACKENDS[chosen], "plan", None)
        if plan is not None:
            lines.append(f"plan: {plan(p)}")
    for name, reasons in tried:
        if name == chosen:
            lines.append(f"  {name}: serves these inputs")
        elif reasons:
            lines.append(f"  {name}: rejected: " + "; ".join(reasons))
        else:
            lines.append(f"  {name}: could serve, but {chosen} comes first")
    if source == "":
        others = [n for n in BACKENDS if n not in dict(tried)]
        for name in others:
            lines.append(f"  {name}: not tried on {p.device.type}")
    return "\n".join(lines)


def available_backends() -> Dict[str, str]:
    return {name: b.summary for name, b in BACKENDS.items()}
