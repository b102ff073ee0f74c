"""Drop-in ``InstanceNorm1d/2d/3d``: the torch classes (constructor, defaults, repr, state_dict, the channel-count
error/warning, unbatched input), with normkit's :func:`~normkit.functional.instance_norm.instance_norm`."""

from __future__ import annotations

import torch

from ..functional.instance_norm import instance_norm
from ._scripting import torch_twin
from ._state_loading import AtomicStateLoading
from ._torch_compat import with_bias


class _InstanceNormMixin(AtomicStateLoading):
    """Replaces torch's call of ``F.instance_norm``; torch's ``forward`` keeps its checks and unbatched handling."""

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """For ``torch.jit.script``: torch's class sharing this module's tensors (see ``normkit.nn._scripting``)."""
        return torch_twin(self)

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNormMixin, with_bias(torch.nn.InstanceNorm1d)):
    r"""Drop-in for :class:`torch.nn.InstanceNorm1d`: per (sample, channel) statistics over the length.

    .. math::
        y = \frac{x - \mathrm{E}_l[x]}{\sqrt{\mathrm{Var}_l[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        momentum: EMA factor of the running statistics (``None``: no update). Default: ``0.1``.
        affine: learnable per-channel :math:`\gamma`, :math:`\beta`. Default: ``False``.
        bias: keyword-only; ``False`` drops :math:`\beta` when ``affine``. Default: ``True``.
        track_running_stats: keep running statistics (used in eval; ``num_batches_tracked`` is not incremented,
            as in torch). Default: ``False``.

    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`. Output: same shape.

    Examples::

        >>> import torch
        >>> from normkit.nn.instancenorm import InstanceNorm1d
        >>> InstanceNorm1d(2)(torch.tensor([[1.0, 3.0], [0.0, 10.0]]))
        tensor([[-1.0000,  1.0000],
                [-1.0000,  1.0000]])
    """


class InstanceNorm2d(_InstanceNormMixin, with_bias(torch.nn.InstanceNorm2d)):
    r"""Drop-in for :class:`torch.nn.InstanceNorm2d`: per (sample, channel) statistics over the plane.

    .. math::
        y = \frac{x - \mathrm{E}_{hw}[x]}{\sqrt{\mathrm{Var}_{hw}[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        momentum: EMA factor of the running statistics (``None``: no update). Default: ``0.1``.
        affine: learnable per-channel :math:`\gamma`, :math:`\beta`. Default: ``False``.
        bias: keyword-only; ``False`` drops :math:`\beta` when ``affine``. Default: ``True``.
        track_running_stats: keep running statistics (used in eval). Default: ``False``.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`. Output: same shape and memory format.

    Examples::

        >>> import torch
        >>> from normkit.nn.instancenorm import InstanceNorm2d
        >>> InstanceNorm2d(3, affine=True)
        InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=False)
    """


class InstanceNorm3d(_InstanceNormMixin, with_bias(torch.nn.InstanceNorm3d)):
    r"""Drop-in for :class:`torch.nn.InstanceNorm3d`: per (sample, channel) statistics over the volume.

    .. math::
        y = \frac{x - \mathrm{E}_{dhw}[x]}{\sqrt{\mathrm{Var}_{dhw}[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        momentum: EMA factor of the running statistics (``None``: no update). Default: ``0.1``.
        affine: learnable per-channel :math:`\gamma`, :math:`\beta`. Default: ``False``.
        bias: keyword-only; ``False`` drops :math:`\beta` when ``affine``. Default: ``True``.
        track_running_stats: keep running statistics (used in eval). Default: ``False``.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`. Output: same shape and memory format.

    Examples::

        >>> import torch
        >>> from normkit.nn.instancenorm import InstanceNorm3d
        >>> InstanceNorm3d(2, track_running_stats=True).state_dict().keys()
        odict_keys(['running_mean', 'running_var', 'num_batches_tracked'])
    """
