"""``ResidualAct``: what a ``BatchNormAct`` leaves when its batch norm is folded away, ``act(x + residual)``."""

from __future__ import annotations

import torch

from ._state_loading import AtomicStateLoading
from .batchnorm_act import _BatchNormActMixin

_ACTIVATIONS = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
                None: lambda z: z}


class ResidualAct(AtomicStateLoading, torch.nn.Module):
    r"""The activation of a :class:`normkit.nn.BatchNormAct2d` without its batch norm: an optional residual, then
    the activation.

    .. math::
        y = \mathrm{act}(x + \mathrm{residual})

    :func:`normkit.tools.fold` puts this layer where a ``BatchNormAct1d/2d/3d`` (or ``SyncBatchNormAct``,
    ``FrozenBatchNormAct*``) stood once its batch norm is folded into the convolution before it: it takes the
    same ``forward(input, residual=None)`` call, so a block that passes its shortcut as ``residual=`` runs
    unchanged. The input is never modified (the sum is a new tensor). No parameters, no buffers, no state_dict
    keys (a ``BatchNormAct``'s keys are all its batch norm's).

    Args:
        act: ``"relu"`` (default), ``"silu"``, ``"gelu"`` (exact, erf) or ``None`` (identity), as in
            :class:`normkit.nn.BatchNormAct2d`.

    Shape:
        - Input: any shape; ``residual``: ``None`` or the input's shape, dtype and device. Output: same as input.

    Examples::

        >>> import torch, normkit
        >>> layer = normkit.nn.ResidualAct("relu")
        >>> layer
        ResidualAct(act='relu')
        >>> x = torch.tensor([[-1.0, 2.0]])
        >>> layer(x, residual=torch.tensor([[3.0, -5.0]]))
        tensor([[2., 0.]])
    """

    def __init__(self, act: str | None = "relu") -> None:
        super().__init__()
        _BatchNormActMixin._check_act(act)
        self.act = act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _BatchNormActMixin._check_residual(self, input, residual)
        z = input if residual is None else input + residual
        return _ACTIVATIONS[self.act](z)

    def extra_repr(self) -> str:
        return f"act={self.act!r}"


__all__ = ["ResidualAct"]
