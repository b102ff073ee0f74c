"""Assertions shared by the tests."""

from __future__ import annotations

import torch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and gradient of ``module``, cloned."""
    state = {name: t.detach().clone() for name, t in module.state_dict(keep_vars=True).items() if t is not None}
    for name, p in module.named_parameters():
        if p.grad is not None:
            state[name + ".grad"] = p.grad.clone()
    return state


def assert_unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), f"{name} changed"


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=""):
    if expected is None:
        assert actual is None, what
        return
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run_pair(ours, theirs, x, grad_seed=1):
    """Forward both modules on copies of ``x``, backward the same upstream gradient, return everything to compare."""
    results = []
    for module in (ours, theirs):
        xi = x.detach().clone().requires_grad_()
        y = module(xi)
        gen = torch.Generator().manual_seed(grad_seed)
        upstream = torch.randn(y.shape, generator=gen).to(y.dtype)
        y.backward(upstream)
        results.append({
            "y": y.detach(),
            "dx": xi.grad,
            "dw": None if module.weight is None else module.weight.grad,
            "db": None if module.bias is None else module.bias.grad,
            "running_mean": None if module.running_mean is None else module.running_mean.clone(),
            "running_var": None if module.running_var is None else module.running_var.clone(),
            "num_batches_tracked": None if module.num_batches_tracked is None else module.num_batches_tracked.clone(),
        })
    return results


def assert_same_results(ours, theirs, atol=1e-5, rtol=1e-5):
    for key in ours:
        assert_close(ours[key], theirs[key], atol=atol, rtol=rtol, what=key)
