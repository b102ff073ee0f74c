"""``convert(model, to)``: swap every batch norm of a model for another implementation, sharing its state.

This module holds ``to="sync"``, ``"normkit"`` and ``"torch"``; the ``norm_layer`` specs (``"gn32"``, ``"frozen"``,
``"brn"``, ...) belong to issue 5 (model tools) and raise ``NotImplementedError`` until then.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import nn as nk

TORCH_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
NORMKIT_BATCH_NORMS = (nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d)
TO_NORMKIT: dict[type, type] = {**dict(zip(TORCH_BATCH_NORMS, NORMKIT_BATCH_NORMS, strict=True)),
                                 torch.nn.SyncBatchNorm: nk.SyncBatchNorm}
TO_TORCH: dict[type, type] = {normkit: torch_ for torch_, normkit in TO_NORMKIT.items()}

# The norm_layer grammar of DESIGN.md section 4; issue 5 (model tools) implements these targets.
_LATER_SPECS = re.compile(r"^(bn|bn-biased|frozen|gn\d+|gn/\d+|ln|in|brn|ghost\d+|cbn|none)$")


def convert(model: torch.nn.Module, to: str, **kwargs) -> torch.nn.Module:
    r"""Every batch norm under ``model`` becomes the implementation named by ``to``, sharing parameters and buffers.

    .. math::
        \mathrm{convert}(f, \mathrm{to})(x) = f(x)

    The outputs do not change (with ``"sync"``: in training they become those of the union of the ranks'
    batches). Parameters and buffers are the same tensor objects in the old and the new layers, ``training`` is
    kept, a batch norm at the root returns the new layer, and submodules are replaced in place (like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`); layers already of the target kind are kept.

    Args:
        model: any module.
        to: ``"sync"`` (:func:`normkit.tools.sync`; keyword ``process_group``), ``"normkit"`` (torch's
            ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become normkit's) or ``"torch"`` (normkit's become
            torch's; a layer with ``running_var="biased"`` raises, since torch cannot store that variance).
            Other classes, including subclasses such as timm's ``BatchNormAct2d``, are left alone by
            ``"normkit"`` and ``"torch"``.
        **kwargs: options of the target (``process_group`` for ``"sync"``).

    Returns:
        ``model``, or the new layer if ``model`` itself was converted.

    Examples::

        >>> import torch, normkit, normkit.tools
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> type(normkit.tools.convert(model, "normkit")[1]).__module__
        'normkit.nn.batchnorm'
        >>> type(normkit.tools.convert(model, "torch")[1]).__module__
        'torch.nn.modules.batchnorm'
    """
    if to == "sync":
        from .sync import sync

        return sync(model, **kwargs)
    if to in ("normkit", "torch"):
        if kwargs:
            raise TypeError(f"convert(model, {to!r}) takes no options, got {sorted(kwargs)}.")
        table = TO_NORMKIT if to == "normkit" else TO_TORCH
        return replace(model, lambda module, _name: _swap(module, table, to),
                       _check_torch_can_store if to == "torch" else None)
    if isinstance(to, str) and _LATER_SPECS.match(to):
        raise NotImplementedError(
            f"convert(model, {to!r}) is not built yet: norm_layer specs are issue 5 (model tools). Available now: "
            "'sync', 'normkit', 'torch'."
        )
    raise ValueError(
        f"convert: unknown target {to!r}; expected 'sync', 'normkit', 'torch', or a norm_layer spec such as "
        "'gn32', 'frozen', 'brn' (issue 5)."
    )


def _swap(module: torch.nn.Module, table: dict[type, type], to: str) -> torch.nn.Module:
    target = table.get(type(module))
    if target is None:
        return module
    options: dict = {}
    if to == "normkit" and hasattr(module, "process_group"):
        options["process_group"] = module.process_group
    if to == "torch" and isinstance(module, nk.SyncBatchNorm):
        options["process_group"] = module.process_group
    return rebuild(module, target, **options)


def _check_torch_can_store(module: torch.nn.Module, name: str) -> None:
    if type(module) in TO_TORCH and module.running_var_mode != "unbiased":
        raise ValueError(
            f"convert(model, 'torch'): {name or 'the model'} ({type(module).__name__}({module.num_features})) "
            "stores the biased variance (running_var='biased'); torch's classes can only store the unbiased one, "
            "so training would change what running_var means. Keep normkit's class there, or rebuild the layer "
            "with running_var='unbiased' first. Nothing was converted."
        )


def rebuild(module: _BatchNorm, target: type, **options) -> torch.nn.Module:
    """A ``target`` layer that shares ``module``'s parameters and buffers and copies its ``training`` flag."""
    new = target(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                 device=torch.device("meta"), bias=module.bias is not None, **options)
    new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def layer_tag(name: str) -> int:
    """A 24-bit number, the same on every rank, that identifies a layer by its dotted name in the model."""
    return zlib.crc32(f"normkit:{name}".encode()) & 0xFFFFFF


def replace(model: torch.nn.Module, swap: Callable[[torch.nn.Module, str], torch.nn.Module],
            check: Callable[[torch.nn.Module, str], None] | None = None) -> torch.nn.Module:
    """Apply ``swap(module, dotted_name)`` to ``model`` and, depth first, to every submodule; replace in place.

    ``check(module, dotted_name)`` runs on every module first and raises for what cannot be converted, so that a
    failed call leaves the model as it was. A module reachable under several names is swapped once and stays
    shared. Returns the (possibly new) root.
    """
    if check is not None:
        for name, module in model.named_modules():
            check(module, name)
    done: dict[int, torch.nn.Module] = {}

    def visit(module: torch.nn.Module, name: str) -> torch.nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = swap(module, name)
        done[id(module)] = new
        for child_name, child in list(module._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child or new is not module:
                new.add_module(child_name, new_child)
        return new

    return visit(model, "")


__all__ = ["convert", "layer_tag", "rebuild", "replace"]
