"""The backend interface.

A backend is one object that
  * says which inputs it can serve: ``reasons(problem)`` returns an empty list when it can, else one short
    sentence per obstacle (shown by ``fastattn.explain`` and in dispatch errors);
  * computes the forward: ``forward(problem, seed) -> (out, lse)`` with ``lse`` the float32 row
    log-sum-exp ``[B, Hq, Lq]`` (natural log; -inf for a fully masked row);
  * computes the backward: ``backward(problem, seed, out, lse, dout, dlse) -> (dq, dk, dv, dmask)``.
    ``dlse`` may be None (the lse output was unused).  ``dmask`` has the mask's own shape (reduced over
    broadcast dimensions) and is None unless the float mask requires grad.

``seed`` is an int64 tensor of one element drawn by the op when ``dropout_p > 0`` (else None); the
dropout keep-mask is a pure function of (seed, batch, head, query index, key index), see
``fastattn.backends.reference.dropout_keep_mask``, so backward regenerates it instead of storing it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..problem import AttentionProblem


class Backend:
    name: str = "?"
    # human summary for the README/explain table
    summary: str = ""
    # True for a backend whose forward is differentiated by torch's autograd itself (torch's own SDPA):
    # the op calls its forward directly instead of going through AttentionFunction, and it has no backward.
    differentiable: bool = False

    def reasons(self, p: AttentionProblem) -> List[str]:
        raise NotImplementedError

    def forward(self, p: AttentionProblem, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, p: AttentionProblem, seed, out, lse, dout, dlse):
        raise NotImplementedError

    def __repr__(self):
        return f"<fastattn backend {self.name!r}>"


class UnavailableBackend(Backend):
    """A slot for a backend that is not built yet; it always declines, saying why."""

    def __init__(self, name: str, why: str):
        self.name = name
        self.why = why
        self.summary = why

    def reasons(self, p):
        return [self.why]
