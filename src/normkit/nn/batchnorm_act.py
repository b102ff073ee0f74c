"""``BatchNormAct1d/2d/3d``: batch norm, an optional residual and an activation in one layer (one fused Triton kernel
on CUDA)."""

from __future__ import annotations

import torch

from .. import kernels
from ..functional import _checks, _dispatch, _layout
from ..functional.batch_norm import batch_norm, train_on_kernels
from . import _scripting
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

ACTIVATIONS = ("relu", "silu", "gelu", None)


_INPLACE_ACTIVATIONS = {"relu": torch.relu_, "silu": lambda z: torch.nn.functional.silu(z, inplace=True),
                        "gelu": torch.nn.functional.gelu, None: lambda z: z}


class _BatchNormActMixin:
    """Forward of the fused layers; everything else (options, buffers, state_dict) is the plain BatchNorm's."""

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "its forward adds a residual and an activation that torch's batch norm "
                                  "does not have")

    @staticmethod
    def _check_act(act) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(
                f"act must be one of 'relu', 'silu', 'gelu' or None, got {act!r}. For another activation use a "
                "plain BatchNorm followed by the activation module."
            )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"

    def _check_residual(self, input: torch.Tensor, residual) -> None:
        if residual is None:
            return
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: residual must be a torch.Tensor or None, got "
                            f"{type(residual).__name__}.")
        if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
            raise ValueError(
                f"{type(self).__name__}: residual must have the input's shape, dtype and device "
                f"({tuple(input.shape)}, {input.dtype}, {input.device}), got ({tuple(residual.shape)}, "
                f"{residual.dtype}, {residual.device}). Project the shortcut (e.g. a 1x1 convolution) or convert "
                "it first; nothing was changed."
            )

    def _add_residual_and_act(self, z: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``act(z + residual)`` written into ``z``, a fresh output of the norm (torchvision's in-place block)."""
        if residual is not None:
            z = z.add_(residual)
        return _INPLACE_ACTIVATIONS[self.act](z)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_residual(input, residual)
        running_mean, running_var, uses_batch_stats = self._buffers_for_call()
        momentum = self._ema_factor()
        counter = self.num_batches_tracked if self._tracks_this_call() else None
        op = "batch_norm_act_train" if uses_batch_stats else "batch_norm_act_eval"
        if input.numel() > 0 and _dispatch.backend_for(
                input, refusal=lambda: kernels.supports(input, self.act), op=op) == "triton":
            return self._fused(input, residual, running_mean, running_var, uses_batch_stats, momentum, counter)
        # torchvision's block: the norm, then the residual added and the activation applied in place
        z = batch_norm(input, running_mean, running_var, self.weight, self.bias, uses_batch_stats, momentum,
                       self.eps, running_var_mode=self.running_var_mode, nonfinite=self.nonfinite,
                       num_batches_tracked=counter)
        return self._add_residual_and_act(z, residual)

    def _fused(self, input, residual, running_mean, running_var, uses_batch_stats, momentum, counter):
        """One Triton kernel for ``act(bn(x) + residual)`` forward and backward, behind batch norm's front (the
        running statistics and ``counter`` as :func:`normkit.functional.batch_norm.train_on_kernels` moves them)."""
        _, momentum, _ = _checks.validate_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                                     uses_batch_stats, momentum, self.eps, self.running_var_mode, 1,
                                                     self.nonfinite)
        x = _layout.in_torch_format(input)
        if not uses_batch_stats:
            return kernels.batch_norm_eval(x, running_mean, running_var, self.weight, self.bias, self.eps,
                                           activation=self.act, residual=residual)
        return train_on_kernels(x, self.weight, self.bias, running_mean, running_var, momentum, self.eps,
                                self.running_var_mode, self.nonfinite, counter, self.act, residual)


_DOC = r"""Batch normalization, an optional residual and an activation in one layer.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta
        + \mathrm{residual}\Big)

    A subclass of :class:`normkit.{bn}` (same arguments, buffers, parameters and state_dict, so weights of a plain
    batch norm load as they are). On CUDA tensors the Triton kernels run it as one fused pass forward and one
    backward that recomputes the activation's derivative from the input and the per-channel statistics; elsewhere
    it is torchvision's block (:func:`normkit.functional.batch_norm`, then the residual added and the activation
    applied in place), so it compiles, exports and transforms like the plain layer.
    The model tools keep the activation: ``normkit.tools.sync`` gives ``SyncBatchNormAct``, ``freeze``
    ``FrozenBatchNormAct*d``, ``fold`` leaves ``ResidualAct``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, running_var, nonfinite:
            as :class:`normkit.{bn}` (defaults ``1e-5``, ``0.1``, ``True``, ``True``, ``None``, ``None``,
            ``True``, ``"unbiased"``, ``"skip"``).
        act: ``"relu"`` (default), ``"silu"``, ``"gelu"`` (exact, erf) or ``None`` (identity).

    Shape:
        - Input: ``{shape}``; ``residual``: ``None`` or the input's shape, dtype and device. Output: same as input.

    Examples::

        >>> import torch
        >>> from normkit.nn.batchnorm_act import {name}
        >>> layer = {name}(4, act="relu")
        >>> x = torch.randn({example})
        >>> y = layer(x, residual=torch.zeros_like(x))
        >>> y.shape, bool((y >= 0).all())
        (torch.Size([{example}]), True)
"""


def _make(base: type, name: str, shape: str, example: str) -> type:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 act: str | None = "relu", running_var: str = "unbiased", nonfinite: str = "skip") -> None:
        _BatchNormActMixin._check_act(act)  # before anything is allocated
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                      running_var=running_var, nonfinite=nonfinite)
        self.act = act

    cls = type(name, (_BatchNormActMixin, base), {"__init__": __init__, "__module__": __name__})
    doc = _DOC
    for key, value in (("{bn}", base.__name__), ("{name}", name), ("{shape}", shape), ("{example}", example)):
        doc = doc.replace(key, value)
    cls.__doc__ = doc
    return cls


BatchNormAct1d = _make(BatchNorm1d, "BatchNormAct1d", "(N, C) or (N, C, L)", "8, 4")
BatchNormAct2d = _make(BatchNorm2d, "BatchNormAct2d", "(N, C, H, W)", "8, 4, 5, 5")
BatchNormAct3d = _make(BatchNorm3d, "BatchNormAct3d", "(N, C, D, H, W)", "8, 4, 3, 3, 3")

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
