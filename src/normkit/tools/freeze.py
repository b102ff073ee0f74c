"""``freeze(model)`` / ``unfreeze(model)``: batch norms become ``FrozenBatchNorm*d`` and back."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .. import nn as nk
from ..nn.frozen import FrozenBatchNorm
from ..nn.frozen_act import FrozenBatchNormDropAct
from . import _norm_act
from .convert import NORMKIT_BATCH_NORMS, TORCH_BATCH_NORMS, replace

FREEZABLE = (*TORCH_BATCH_NORMS, *NORMKIT_BATCH_NORMS, torch.nn.SyncBatchNorm, nk.SyncBatchNorm)


def freeze(model: torch.nn.Module, submodules: Iterable[str] | str | None = None) -> torch.nn.Module:
    r"""Every batch norm under ``model`` (or under the dotted ``submodules``) becomes a ``FrozenBatchNorm*d``.

    .. math::
        \mathrm{freeze}(f)(x) = f_{\mathrm{eval}}(x)\ \text{at the batch norms, in training and in evaluation}

    torch's and normkit's ``BatchNorm1d/2d/3d`` become ``normkit.nn.FrozenBatchNorm1d/2d/3d`` of the same
    rank and ``SyncBatchNorm`` becomes the rank-free :class:`normkit.nn.FrozenBatchNorm`, through
    :meth:`~normkit.nn.FrozenBatchNorm.from_batch_norm`: the output is the layer's ``eval()`` output, ``weight``,
    ``bias`` and the running statistics are copied into buffers (detached clones: the old layer and the frozen
    one share nothing), and the class, ``momentum``, ``affine``, ``requires_grad`` flags and options are
    remembered for :func:`unfreeze`.

    Why replace the layers rather than call ``bn.eval()`` and set ``requires_grad=False`` (the other common
    recipe): the next ``model.train()`` silently puts such a layer back into training, where it normalizes with
    batch statistics and moves its running statistics. A frozen layer has no parameters and no training mode,
    so nothing but :func:`unfreeze` changes it, and its state_dict keys stay those of the batch norm.

    Batch norms with an activation keep it: normkit's ``BatchNormAct1d/2d/3d`` and ``SyncBatchNormAct`` become
    :class:`normkit.nn.FrozenBatchNormAct2d` (1d, 3d; rank-free :class:`normkit.nn.FrozenBatchNormAct`), with the
    same ``act`` and ``residual`` argument; a batch norm subclass with ``act`` and ``drop`` submodules (timm's
    ``BatchNormAct2d`` and ``SyncBatchNormAct``, recognised by those attributes) becomes
    :class:`normkit.nn.FrozenBatchNormDropAct`, which keeps those two modules; :func:`unfreeze` gives each its
    class back. Forward hooks and pre-hooks of a replaced layer move to the new one (see
    :func:`normkit.tools.convert`).

    Other layers are not touched (their parameters keep ``requires_grad``; set it yourself to freeze a
    backbone's convolutions). A layer shared between several places is frozen once and stays shared. Another
    batch norm subclass normkit does not know (a frozen layer would drop what it adds) and a batch norm without
    running statistics (``track_running_stats=False``) raise, and so does an unknown name in ``submodules``; a
    failed call changes nothing.

    Args:
        model: any module; a batch norm itself returns its frozen copy.
        submodules: dotted names as in ``model.named_modules()`` (``"layer1"``, ``"layer2.0.bn1"``; a single
            string is one name, ``""`` is ``model``); only the batch norms under them are frozen. ``None``: all.
            Default: ``None``

    Returns:
        ``model`` with its batch norms replaced in place, or the new layer if ``model`` is a batch norm.

    Examples::

        >>> import torch, normkit.tools
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> normkit.tools.freeze(model)[1]
        FrozenBatchNorm2d(8, eps=1e-05)
        >>> normkit.tools.unfreeze(model)[1]
        BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """
    selected = _selected(model, submodules, "freeze")

    def chosen(module: torch.nn.Module) -> bool:
        return isinstance(module, _BatchNorm) and (selected is None or id(module) in selected)

    def check(module: torch.nn.Module, name: str) -> None:
        if chosen(module):
            check_freezable(module, name, "freeze")

    return replace(model, lambda module, _name: _norm_act.frozen(module) if chosen(module) else module, check)


def unfreeze(model: torch.nn.Module, submodules: Iterable[str] | str | None = None) -> torch.nn.Module:
    r"""Every :class:`normkit.nn.FrozenBatchNorm` under ``model`` (or under ``submodules``) becomes trainable again.

    .. math::
        \mathrm{unfreeze}(\mathrm{freeze}(f)) = f

    Each frozen layer becomes the batch norm it was frozen from (:meth:`~normkit.nn.FrozenBatchNorm.to_batch_norm`):
    the same class, ``momentum``, ``eps``, ``affine``, ``track_running_stats``, ``requires_grad`` flags and
    normkit options, with its current values (cloned) in new parameters and buffers, and the frozen layer's
    ``training`` flag (a ``FrozenBatchNormAct*`` its ``BatchNormAct``/``SyncBatchNormAct`` with the same ``act``; a
    :class:`normkit.nn.FrozenBatchNormDropAct` the source's own class, timm's ``BatchNormAct2d`` say, with its
    ``drop`` and ``act`` modules). A frozen layer built directly becomes normkit's ``BatchNorm1d/2d/3d`` (or
    ``BatchNormAct1d/2d/3d``) with torch's defaults; a directly built ``FrozenBatchNormDropAct`` raises. Layers
    frozen by other libraries (torchvision's, detectron2's ``FrozenBatchNorm2d``) are left alone. A new optimizer
    is needed for the new parameters.

    Args:
        model: any module; a frozen batch norm itself returns the new batch norm.
        submodules: dotted names as in ``model.named_modules()``; only the frozen layers under them are
            unfrozen. ``None``: all. Default: ``None``

    Returns:
        ``model`` with its frozen layers replaced in place, or the new layer if ``model`` is a frozen layer.

    Examples::

        >>> import torch, normkit.tools
        >>> bn = torch.nn.BatchNorm1d(4, momentum=0.01)
        >>> again = normkit.tools.unfreeze(normkit.tools.freeze(bn))
        >>> type(again) is torch.nn.BatchNorm1d, again.momentum, again is bn
        (True, 0.01, False)
    """
    selected = _selected(model, submodules, "unfreeze")

    def chosen(module: torch.nn.Module) -> bool:
        return isinstance(module, FrozenBatchNorm) and (selected is None or id(module) in selected)

    def check(module: torch.nn.Module, name: str) -> None:
        if chosen(module) and isinstance(module, FrozenBatchNormDropAct) and (
                "template" not in (getattr(module, "_unfrozen_config", None) or {})):
            raise TypeError(
                f"unfreeze: {name or 'the model'} is a FrozenBatchNormDropAct built directly, not by freeze, so the "
                "class to rebuild is not known. Replace it yourself, or leave it out with submodules=[...]. Nothing "
                "was changed."
            )

    return replace(model, lambda module, _name: module.to_batch_norm() if chosen(module) else module, check)


def check_freezable(module: torch.nn.Module, name: str, caller: str) -> None:
    """Raise for a batch norm that :meth:`FrozenBatchNorm.from_batch_norm` must not convert."""
    where = name or "the model"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise TypeError(
            f"{caller}: {where} is an uninitialized {type(module).__name__}; its number of features is not known "
            "yet. Run one forward pass first. Nothing was changed."
        )
    if type(module) not in FREEZABLE and not _norm_act.carries_activation(module):
        raise TypeError(
            f"{caller}: {where} is a {type(module).__module__}.{type(module).__name__}, a batch norm subclass "
            "normkit does not know; a FrozenBatchNorm would drop what it adds. Use its library's own tool, or "
            "leave it out with submodules=[...]. (Layers normkit freezes: torch's and normkit's BatchNorm1d/2d/3d "
            "and SyncBatchNorm, normkit's BatchNormAct1d/2d/3d and SyncBatchNormAct, and batch norms with act and "
            "drop submodules, timm's BatchNormAct2d layout.) Nothing was changed."
        )
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"{caller}: {where} ({type(module).__name__}({module.num_features})) has no running statistics "
            "(track_running_stats=False): in eval it normalizes with each batch's own statistics, so there are none "
            "to freeze. Build it with track_running_stats=True and estimate them (normkit.tools.recalibrate), or "
            "leave it out with submodules=[...]. Nothing was changed."
        )


def _selected(model: torch.nn.Module, submodules, caller: str) -> set[int] | None:
    """The ids of every module under the named submodules (``None``: everything); every name is checked first."""
    if submodules is None:
        return None
    names = [submodules] if isinstance(submodules, str) else list(submodules)
    roots = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{caller}: submodules must be dotted names (str), got {name!r} "
                            f"({type(name).__name__}). Pass e.g. submodules=['layer1', 'layer2.0'].")
        try:
            roots.append(model.get_submodule(name))
        except AttributeError:
            known = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            examples = ", ".join(map(repr, known[:5])) or "(none: the model has no submodules)"
            raise ValueError(
                f"{caller}: {type(model).__name__} has no submodule {name!r}; expected a dotted name from "
                f"model.named_modules(), such as {examples}.{hint} Nothing was changed."
            ) from None
    return {id(module) for root in roots for module in root.modules()}


__all__ = ["freeze", "unfreeze"]
