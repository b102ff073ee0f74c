"""``param_groups(model, lr)``: optimizer groups that treat normalization parameters apart."""

from __future__ import annotations

import re

import torch
from torch.nn.modules.batchnorm import _NormBase

# torch's normalization layers (normkit's subclass them); _NormBase covers BatchNorm*, SyncBatchNorm, InstanceNorm*.
NORM_TYPES: tuple[type, ...] = (_NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.LocalResponseNorm,
                                *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()))
# Other libraries' norms by name: "Norm" not followed by a lowercase letter (EvoNorm2dB0, RmsNorm, LayerNorm2d,
# FilterResponseNormTlu2d, FrozenBatchNormAct2d), which leaves out Normalize, Normal, ...
_NORM_NAME = re.compile(r"Norm(?![a-z])")


def is_norm_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalization layer in the sense of :func:`param_groups`."""
    return isinstance(module, NORM_TYPES) or any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__)


def param_groups(model: torch.nn.Module, lr: float, *, norm_lr_scale: float = 1.0, norm_weight_decay: float = 0.0,
                 weight_decay: float = 0.0) -> list[dict]:
    r"""Optimizer parameter groups: the normalization layers' parameters apart from the rest.

    .. math::
        \mathrm{lr}_{\mathrm{norm}} = \mathrm{lr} \cdot \mathrm{norm\_lr\_scale}

    The article's transfer-learning strategies are one call each: train the batch norms with a 10x smaller
    learning rate (``norm_lr_scale=0.1``), or keep them out of weight decay (the default
    ``norm_weight_decay=0``: decaying :math:`\gamma` towards 0 shrinks the layer's output, which is seldom
    meant). To freeze them instead, use :func:`normkit.tools.freeze`.

    A normalization layer is an instance of torch's ``_NormBase`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    ``InstanceNorm1d/2d/3d``), ``GroupNorm``, ``LayerNorm``, ``RMSNorm``, ``LocalResponseNorm`` (normkit's layers
    subclass these), or a module whose class or a base class has ``Norm`` in its name not followed by a lowercase
    letter, so that other libraries' norms count (timm's ``EvoNorm2dB0``, ``RmsNorm``, ``LayerNorm2d``,
    ``FilterResponseNormTlu2d``; not ``Normalize``). Its *own* parameters (not those of submodules, e.g. an
    activation with parameters inside a norm-act layer, which count as theirs) go to the norm group. Biases of
    other layers stay in the other group (timm's ``param_groups_weight_decay`` also exempts those; pass your
    own groups if you want that).

    Each parameter appears once: a parameter shared by several modules belongs to the first module that
    registers it, in ``model.named_parameters()`` order (the order of the parameters in each group too). Only
    parameters with ``requires_grad=True`` are listed, and an empty group is left out, so the result always
    goes straight into an optimizer. Each group has a ``"name"`` (``"other"``, ``"norm"``), which torch
    optimizers keep in ``optimizer.param_groups``.

    Args:
        model: any module.
        lr: the learning rate of the other parameters.
        norm_lr_scale: the normalization parameters' learning rate is ``lr * norm_lr_scale``. Default: ``1.0``
        norm_weight_decay: the normalization parameters' weight decay. Default: ``0.0``
        weight_decay: the other parameters' weight decay. Default: ``0.0``

    Returns:
        ``[{"name": "other", "params": [...], "lr": lr, "weight_decay": weight_decay},
        {"name": "norm", "params": [...], "lr": lr * norm_lr_scale, "weight_decay": norm_weight_decay}]``,
        without the empty ones.

    Examples::

        >>> import torch, normkit.tools
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> groups = normkit.tools.param_groups(model, 0.1, norm_lr_scale=0.1, weight_decay=1e-4)
        >>> [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
        [('other', 2, 0.1, 0.0001), ('norm', 2, 0.010000000000000002, 0.0)]
        >>> optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"param_groups: expected a torch.nn.Module, got {type(model).__name__}. Pass the model, "
                        "not model.parameters().")
    for name, value in (("lr", lr), ("norm_lr_scale", norm_lr_scale), ("norm_weight_decay", norm_weight_decay),
                        ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"param_groups: {name} must be a non-negative number, got {value!r}.")
    seen: set[int] = set()
    norm: list[torch.nn.Parameter] = []
    other: list[torch.nn.Parameter] = []
    for module in model.modules():
        target = norm if is_norm_layer(module) else other
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if parameter.requires_grad:
                target.append(parameter)
    groups = [
        {"name": "other", "params": other, "lr": lr, "weight_decay": weight_decay},
        {"name": "norm", "params": norm, "lr": lr * norm_lr_scale, "weight_decay": norm_weight_decay},
    ]
    return [group for group in groups if group["params"]]


__all__ = ["is_norm_layer", "param_groups"]
