"""fastattn.optim.SAM against the paper's Algorithm 1 written out by hand."""
import pytest
import torch

from fastattn.optim import SAM


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    loss_fn = lambda m: ((m(x) - y) ** 2).mean()  # noqa: E731
    return model, loss_fn


def _manual_sam_step(model, loss_fn, rho, lr, adaptive):
    """Algorithm 1, by hand, with plain SGD as the base step."""
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model), params)
    if adaptive:
        norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g)))
        eps = [rho * p.detach() ** 2 * gi / norm for p, gi in zip(params, g)]
    else:
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        eps = [rho * gi / norm for gi in g]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    g2 = torch.autograd.grad(loss_fn(model), params)
    with torch.no_grad():
        for p, e, gi in zip(params, eps, g2):
            p.sub_(e).sub_(lr * gi)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("use_closure", [False, True])
def test_sam_matches_algorithm_1(adaptive, use_closure):
    model, loss_fn = _problem()
    manual, _ = _problem()
    rho = 0.5 if adaptive else 0.05
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    for _ in range(3):
        if use_closure:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model)
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert loss.ndim == 0
        else:
            loss_fn(model).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model).backward()
            opt.second_step(zero_grad=True)
        _manual_sam_step(manual, loss_fn, rho, 0.1, adaptive)
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_first_step_moves_by_rho():
    model, loss_fn = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    loss_fn(model).backward()
    opt.first_step()
    dist = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert abs(dist.item() - 0.05) < 1e-12
    opt.second_step()
    # The base step is taken from w, not from w + e: the weights moved by lr * g2 from `before`.
    assert all(p.grad is not None for p in model.parameters())


def test_base_optimizer_state_and_scheduler():
    model, loss_fn = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        loss_fn(model).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert all("momentum_buffer" in opt.base_optimizer.state[p] for p in model.parameters())
    sd = opt.state_dict()
    model2, _ = _problem()
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.025)


def test_sam_reduces_loss_with_adam():
    model, loss_fn = _problem()
    opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2)
    first = loss_fn(model).item()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss
    for _ in range(50):
        opt.step(closure)
    assert loss_fn(model).item() < 0.5 * first


def test_bad_arguments():
    model, loss_fn = _problem()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    with pytest.raises(ValueError, match="rho: must be a positive number in every parameter group"):
        SAM([{"params": list(model.parameters()), "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
