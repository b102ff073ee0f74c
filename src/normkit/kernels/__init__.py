"""normkit's Triton kernels, behind thin lazy wrappers: importing this package never imports triton.

Each wrapper imports its kernel module on first call. ``normkit.functional`` dispatches here for CUDA tensors
(and for CPU tensors when forced under ``TRITON_INTERPRET=1``, how the tests run the kernels); see
``docs/kernels.md``.
"""

from __future__ import annotations

import torch

# Running-statistics dtypes the statistics kernel updates in place (others: the front moves them).
BUFFER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def batch_norm_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                     channel_dim: int = 1, activation: str | None = None, residual: torch.Tensor | None = None,
                     running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                     num_batches_tracked: torch.Tensor | None = None, momentum: float = 0.1,
                     running_var_mode: str = "unbiased", nonfinite: str = "skip", checked: bool = False):
    """Training batch norm on Triton: ``(y, mean, biased_var)``, moving the running statistics and the counter
    given; see ``normkit.kernels._batch_norm.batch_norm_train``."""
    from ._batch_norm import batch_norm_train as impl

    return impl(x, weight, bias, eps, channel_dim=channel_dim, activation=activation, residual=residual,
                running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
                momentum=momentum, running_var_mode=running_var_mode, nonfinite=nonfinite, checked=checked)


def batch_norm_eval(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *, channel_dim: int = 1,
                    activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluation batch norm on Triton: ``y``; see ``normkit.kernels._batch_norm.batch_norm_eval``."""
    from ._batch_norm import batch_norm_eval as impl

    return impl(x, running_mean, running_var, weight, bias, eps, channel_dim=channel_dim, activation=activation,
                residual=residual)


def supports(x: torch.Tensor, activation: str | None = None) -> str | None:
    """``None`` when the batch-norm kernels take this call, else a short reason (the dispatcher falls back)."""
    from ._support import supports as impl

    return impl(x, activation)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, activation: str | None = None) -> torch.Tensor:
    r"""Group normalization (then an optional fused activation) on Triton; differentiable.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \cdot \gamma
        + \beta\right)

    Statistics per (sample, group) in float32 whatever the input dtype; large groups are split over several
    programs (partial count/mean/M2 merged with Chan's formula). The backward recomputes the activation's
    derivative from ``x`` and the saved statistics; under ``create_graph=True`` it differentiates the reference
    formula instead, so higher-order gradients work. No validation: :func:`normkit.functional.group_norm`
    validates and dispatches here; check :func:`supports_group_norm` first.

    Args:
        x: ``(N, C, *)`` float32/float16/bfloat16 CUDA tensor (CPU under ``TRITON_INTERPRET=1``).
        num_groups: number of groups; divides ``C``.
        weight, bias: ``(C,)`` affine parameters or ``None``. Default: ``None``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        activation: ``None``, ``"silu"`` or ``"relu"``, applied after the affine. Default: ``None``.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape, dtype and memory format (contiguous or channels_last).

    Examples (on a GPU)::

        x = torch.randn(8, 320, 64, 64, device="cuda", dtype=torch.bfloat16)
        gn = torch.nn.GroupNorm(32, 320).cuda()
        y = normkit.kernels.group_norm(x, 32, gn.weight, gn.bias, 1e-5, activation="silu")  # GN + SiLU, one pass
    """
    from ._group_norm import group_norm as impl

    return impl(x, num_groups, weight, bias, eps, activation=activation)


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` on Triton; differentiable.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    One program per row (several rows for short ones), float32 statistics; weight and bias gradients come from
    per-program partial sums reduced afterwards (no atomics). Under ``create_graph=True`` the backward
    differentiates the reference formula. No validation: :func:`normkit.functional.layer_norm` validates and
    dispatches here; check :func:`supports_layer_norm` first.

    Args:
        x: ``(*, *normalized_shape)`` float32/float16/bfloat16 CUDA tensor (CPU under ``TRITON_INTERPRET=1``).
        normalized_shape: the trailing shape to normalize over (an int: the last dimension).
        weight, bias: affine parameters of shape ``normalized_shape`` or ``None``. Default: ``None``.
        eps: added to the variance inside the square root. Default: ``1e-5``.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`. Output: same shape and dtype (contiguous).

    Examples (on a GPU)::

        x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
        y = normkit.kernels.layer_norm(x, 4096, torch.ones(4096, device="cuda"), None)
    """
    from ._layer_norm import layer_norm as impl

    return impl(x, normalized_shape, weight, bias, eps)


def supports_group_norm(x: torch.Tensor, num_groups: int, activation: str | None = None) -> str | None:
    """``None`` when :func:`group_norm` takes this call, else a short reason (the dispatcher falls back to ATen)."""
    from ._group_norm import supports as impl

    return impl(x, num_groups, activation)


def supports_layer_norm(x: torch.Tensor, normalized_shape) -> str | None:
    """``None`` when :func:`layer_norm` takes this call, else a short reason (the dispatcher falls back to ATen)."""
    from ._layer_norm import supports as impl

    return impl(x, normalized_shape)


__all__ = ["BUFFER_DTYPES", "batch_norm_eval", "batch_norm_train", "group_norm", "layer_norm", "supports",
           "supports_group_norm", "supports_layer_norm"]
