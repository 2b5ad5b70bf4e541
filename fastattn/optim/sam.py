"""Sharpness-Aware Minimization (Foret et al., 2021), wrapping any base optimizer.

Algorithm 1 of the paper, one update:

1. with the gradient ``g = ∇L(w)`` at the current weights, move to the (approximate) worst point of the
   ``rho``-ball: ``ε̂ = rho · g / ‖g‖₂`` (``‖·‖`` over *all* parameters together);
2. compute the gradient again at ``w + ε̂``;
3. restore ``w`` and let the base optimizer step with that second gradient.

Adaptive SAM (Kwon et al., 2021; ``adaptive=True``) scales the ball per weight by ``|w|``:
``ε̂ = rho · w² ⊙ g / ‖ |w| ⊙ g ‖``.

Two ways to use it::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    # explicit steps
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)     # w <- w + e
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)    # w <- w - e, then the base step

    # or a closure that zeroes, computes and backpropagates the loss
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)                  # returns the loss at w (the first evaluation)

Batch norm statistics see both forward passes; freeze them in the second if that matters to you.
"""
from __future__ import annotations

from typing import Callable, Optional, Type

import torch

__all__ = ["SAM"]


def _check_rho(rho, where: str = "") -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho: must be a positive number{where}, got {rho!r}")


class SAM(torch.optim.Optimizer):
    """Args:
        params: parameters or parameter groups (as for any optimizer; per-group ``rho``/``adaptive`` allowed).
        base_optimizer: the optimizer *class* that makes the actual update (e.g. ``torch.optim.SGD``); it is built
            on this optimizer's parameter groups, so both share hyper-parameters (``lr`` schedules apply to both).
        rho: radius of the neighbourhood (> 0).  The paper uses 0.05 (0.5–2.0 for adaptive SAM).
        adaptive: adaptive SAM (scale-invariant neighbourhood).
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).
    """

    def __init__(self, params, base_optimizer: Type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, **kwargs):
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer: expected a torch.optim.Optimizer subclass, got {base_optimizer!r}")
        _check_rho(rho)
        super().__init__(params, dict(rho=float(rho), adaptive=bool(adaptive), **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        for group in self.base_optimizer.param_groups:  # per-group rho: the same rule as the default's
            _check_rho(group["rho"], " in every parameter group")
        # Share the groups, so a change to self.param_groups (an lr scheduler on SAM) reaches the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """‖g‖ (or ‖|w| ⊙ g‖ for adaptive groups) over every parameter with a gradient, in float32 or wider."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.abs() * p.abs() if group["adaptive"] else p.grad
                norms.append(torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)))
        if not norms:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call backward() first")
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to ``w + ε̂`` (remembering ``w``)."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale.to(p.dtype).to(p.device)
                if group["adaptive"]:
                    e = e * p.square()
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and step the base optimizer with the gradient taken at ``w + ε̂``."""
        restored = False
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None) if p in self.state else None
                if old is not None:
                    p.copy_(old)
                    restored = True
        if not restored:
            raise RuntimeError("SAM.second_step: call first_step() before second_step()")
        self.base_optimizer.step()
        self._opt_called = True  # an update happened (torch's lr schedulers check this flag after step())
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One SAM update with ``closure`` (zero the gradients, compute the loss, backward, return the loss);
        it is called twice.  Returns the first loss."""
        if closure is None:
            raise ValueError("closure: SAM.step needs a closure that re-evaluates the loss "
                             "(or call first_step() and second_step() yourself)")
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
