"""Drop-in ``GroupNorm`` and ``LayerNorm``: the torch classes (constructor, defaults, repr, state_dict, errors),
with normkit's functional implementations."""

from __future__ import annotations

import torch

from ..functional.group_norm import group_norm
from ..functional.layer_norm import layer_norm
from ._scripting import torch_twin
from ._state_loading import AtomicStateLoading
from ._torch_compat import with_bias


class GroupNorm(AtomicStateLoading, with_bias(torch.nn.GroupNorm)):
    r"""Drop-in for :class:`torch.nn.GroupNorm`: normalizes each sample over groups of channels.

    .. math::
        y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        num_groups: number of groups to separate the channels into; must divide ``num_channels``.
        num_channels: number of channels ``C`` of the input.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        affine: learnable per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros). Default: ``True``.
        bias: keyword-only; ``False`` drops :math:`\beta`. Default: ``True``.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape, dtype and memory format (channels_last stays).

    Examples::

        >>> import torch
        >>> from normkit.nn.normalization import GroupNorm
        >>> gn = GroupNorm(2, 4)
        >>> gn
        GroupNorm(2, 4, eps=1e-05, affine=True, bias=True)
        >>> gn(torch.tensor([[[1.0], [3.0], [10.0], [30.0]]])).flatten()
        tensor([-1.0000,  1.0000, -1.0000,  1.0000], grad_fn=<ViewBackward0>)
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """For ``torch.jit.script``: torch's class sharing this module's tensors (see ``normkit.nn._scripting``)."""
        return torch_twin(self)


class LayerNorm(AtomicStateLoading, torch.nn.LayerNorm):
    r"""Drop-in for :class:`torch.nn.LayerNorm`: normalizes each sample over its trailing ``normalized_shape``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        normalized_shape: trailing shape to normalize over (an int means the last dimension).
        eps: added to the variance inside the square root. Default: ``1e-5``.
        elementwise_affine: learnable elementwise :math:`\gamma` (ones) and :math:`\beta` (zeros). Default: ``True``.
        bias: ``False`` drops :math:`\beta`. Default: ``True``.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`. Output: same shape and dtype.

    Examples::

        >>> import torch
        >>> from normkit.nn.normalization import LayerNorm
        >>> ln = LayerNorm(4)
        >>> ln
        LayerNorm((4,), eps=1e-05, elementwise_affine=True, bias=True)
        >>> ln(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).detach()
        tensor([[-1.3416, -0.4472,  0.4472,  1.3416]])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """For ``torch.jit.script``: torch's class sharing this module's tensors (see ``normkit.nn._scripting``)."""
        return torch_twin(self)
