"""``sync(model)``: every batch norm of a model synchronised over a ``torch.distributed`` process group."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .. import nn as nk
from ..nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..nn.syncbatchnorm_act import SyncBatchNormAct
from .convert import NORMKIT_BATCH_NORMS, TORCH_BATCH_NORMS, layer_tag, rebuild, replace

_PLAIN = (*TORCH_BATCH_NORMS, *NORMKIT_BATCH_NORMS, torch.nn.SyncBatchNorm)
_WITH_ACT = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)


def sync(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    r"""Every batch norm under ``model`` becomes a :class:`normkit.nn.SyncBatchNorm` sharing its state.

    .. math::
        \mu = \frac{\sum_r n_r \mu_r}{\sum_r n_r},\qquad
        M_2 = \sum_r \big(M_{2,r} + n_r (\mu_r - \mu)^2\big)

    torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` and normkit's ``BatchNorm1d/2d/3d`` are replaced by a
    :class:`normkit.nn.SyncBatchNorm` whose ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` are the *same* tensor objects, with the same ``training`` flag and (from normkit's
    layers) the same ``running_var``/``nonfinite`` options. normkit's ``BatchNormAct1d/2d/3d`` become a
    :class:`normkit.nn.SyncBatchNormAct` the same way, with the same ``act`` (and ``residual`` argument). A normkit
    ``SyncBatchNorm`` (``SyncBatchNormAct`` included) is kept (its ``process_group`` is set when one is given). A
    batch norm subclass with a ``to_sync(process_group)`` method (the hook for layers that add behaviour) is
    converted by that method; any other subclass (e.g. timm's ``BatchNormAct2d``: use
    ``timm.layers.convert_sync_batchnorm``, which gives timm's ``SyncBatchNormAct``) raises ``TypeError`` rather
    than silently losing its extra behaviour. Every converted layer is tagged with its dotted name, which lets the
    layers detect ranks that call them out of order. Forward hooks and pre-hooks of a replaced layer move to the
    new one. Submodules are replaced in place; a batch norm root returns the new layer.

    Args:
        model: any module.
        process_group: the group to synchronise over; ``None`` is the default (world) group. Default: ``None``

    Returns:
        ``model``, or the new layer if ``model`` itself is a batch norm.

    Examples::

        >>> import torch, normkit, normkit.tools
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> synced = normkit.tools.sync(bn)
        >>> type(synced).__name__, synced.weight is bn.weight, synced.running_mean is bn.running_mean
        ('SyncBatchNorm', True, True)
    """

    def swap(module: torch.nn.Module, name: str) -> torch.nn.Module:
        if not isinstance(module, _BatchNorm):
            return module
        if isinstance(module, nk.SyncBatchNorm):
            new = module
            if process_group is not None:
                new.process_group = process_group
        elif type(module) in _PLAIN or type(module) in _WITH_ACT:
            options = {"running_var": getattr(module, "running_var_mode", "unbiased"),
                       "nonfinite": getattr(module, "nonfinite", "skip")}
            if type(module) in _WITH_ACT:
                target, options["act"] = SyncBatchNormAct, module.act
            else:
                target = nk.SyncBatchNorm
            new = rebuild(module, target, process_group=process_group, **options)
        else:
            new = module.to_sync(process_group)
        if isinstance(new, nk.SyncBatchNorm):
            new._sync_tag, new._sync_name = layer_tag(name), name
        return new

    return replace(model, swap, _check_convertible)


def _check_convertible(module: torch.nn.Module, name: str) -> None:
    if (not isinstance(module, _BatchNorm) or type(module) in _PLAIN or type(module) in _WITH_ACT
            or isinstance(module, nk.SyncBatchNorm)):
        return
    if callable(getattr(module, "to_sync", None)):
        return
    if isinstance(module, LazyModuleMixin):
        raise TypeError(
            f"sync: {name or 'the model'} is an uninitialized {type(module).__name__}; its number of features "
            "is not known yet. Run one forward pass first, then call sync(model). Nothing was converted."
        )
    raise TypeError(
        f"sync: {name or 'the model'} is a {type(module).__module__}.{type(module).__name__}, a batch norm "
        "subclass normkit does not know; replacing it by a plain SyncBatchNorm would drop what it adds "
        "(e.g. the activation of timm's BatchNormAct2d). Give the class a to_sync(process_group) method that "
        "returns its synchronised version, or use its library's converter (timm.layers.convert_sync_batchnorm, "
        "which turns timm's BatchNormAct2d into its SyncBatchNormAct). Nothing was converted."
    )
