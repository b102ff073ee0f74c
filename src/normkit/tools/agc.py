"""Adaptive gradient clipping (AGC, Brock et al. 2021), unit-wise, in place."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def _require_number(name: str, value, allow_zero: bool) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        hint = " The paper uses clip_factor=0.01 at batch 1024-4096." if name == "clip_factor" else " Default 1e-3."
        raise ValueError(f"adaptive_clip_grad: {name} must be a finite {bound} number, got {value!r}.{hint}")
    return float(value)


def _as_tensors(items, what: str) -> list[torch.Tensor]:
    if isinstance(items, torch.nn.Module):
        return list(items.parameters())
    if isinstance(items, torch.Tensor):
        return [items]
    out: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            out.extend(item.parameters())
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(
                f"adaptive_clip_grad: {what} must hold tensors (parameters) or modules, got {type(item).__name__}."
            )
    return out


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm per output unit: over dims 1.. of a weight (OI, OIHW), the whole norm of a vector or scalar;
    shaped to broadcast against ``x``."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def adaptive_clip_grad(parameters: torch.Tensor | Iterable[torch.Tensor] | torch.nn.Module,
                       clip_factor: float = 0.01, eps: float = 1e-3, *,
                       skip: torch.Tensor | torch.nn.Module | Iterable[torch.Tensor | torch.nn.Module] = ()) -> None:
    r"""Clip every gradient unit-wise, in place, relative to the norm of its weight (AGC).

    .. math::
        G_i \leftarrow \begin{cases}
            \lambda \dfrac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} G_i
                & \text{if } \lVert G_i \rVert > \lambda \max(\lVert W_i \rVert, \epsilon) \\
            G_i & \text{otherwise}
        \end{cases}

    A unit :math:`i` is an output row: the norm runs over every dimension but the first (``(O, I)`` linear and
    ``(O, I, kH, kW)`` conv weights); a vector (bias, gain) is one unit with its full norm. Brock et al. 2021
    (arXiv 2102.06171, §4, ``nfnets/optim.py``); a clipped row's norm becomes exactly
    :math:`\lambda \max(\lVert W_i \rVert, \epsilon)` (the divisor is :math:`\max(\lVert G_i \rVert, 10^{-6})` as in
    the reference code) and rows under the threshold are left bit-for-bit unchanged. Parameters without a gradient
    are ignored.

    The paper found "it is always better to not clip the final linear layer": exclude it with ``skip`` (parameters
    or modules, compared by identity), or pass only the parameters to clip.

    Args:
        parameters: a module (its parameters), a tensor, or an iterable of tensors/modules.
        clip_factor: :math:`\lambda > 0`. Default: ``0.01`` (the paper's at batch 1024-4096; larger for smaller
            batches).
        eps: :math:`\epsilon \ge 0`, the smallest weight norm, so zero-initialized weights can move. Default:
            ``1e-3``.
        skip: parameters or modules whose gradients are left untouched, e.g. ``skip=model.fc``. Default: none.

    Examples::

        >>> import torch
        >>> from normkit.tools.agc import adaptive_clip_grad
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> model(torch.randn(3, 4)).pow(2).sum().mul(1e3).backward()
        >>> adaptive_clip_grad(model, 0.01, skip=model[2])
        >>> w, g = model[0].weight, model[0].weight.grad
        >>> bool((g.norm(dim=1) <= 0.01 * w.norm(dim=1).clamp_min(1e-3) * (1 + 1e-5)).all())
        True
    """
    clip_factor = _require_number("clip_factor", clip_factor, allow_zero=False)
    eps = _require_number("eps", eps, allow_zero=True)
    params = _as_tensors(parameters, "parameters")
    skipped = {id(p) for p in _as_tensors(skip, "skip")}
    todo = [p for p in params if id(p) not in skipped and p.grad is not None]
    for p in todo:
        if p.grad.is_sparse:
            raise RuntimeError("adaptive_clip_grad: sparse gradients are not supported; densify them or skip them.")
    seen: set[int] = set()
    with torch.no_grad():
        for p in todo:
            if id(p) in seen:  # a parameter listed twice is clipped once
                continue
            seen.add(id(p))
            grad = p.grad
            max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clip_factor
            grad_norm = unitwise_norm(grad)
            clipped = grad * (max_norm / grad_norm.clamp_min(1e-6))
            grad.copy_(torch.where(grad_norm > max_norm, clipped, grad))


__all__ = ["adaptive_clip_grad", "unitwise_norm"]
