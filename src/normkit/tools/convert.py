"""``convert(model, to)``: swap every batch norm of a model for another implementation or another norm.

``to="sync"``, ``"normkit"`` and ``"torch"`` change the implementation and share the state; a ``norm_layer`` spec
(``"gn32"``, ``"frozen"``, ``"in"``, ...) changes the normalization and carries over what carries.
"""

from __future__ import annotations

import warnings
import weakref
import zlib
from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .. import nn as nk
from ..nn._torch_compat import build
from ..nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..nn.frozen import FrozenBatchNorm, _default_config, _unfreeze, rank_of
from ..nn.norm_layer import BATCH_NORMS, Spec, groups, norm_layer, parse, unknown
from ..nn.syncbatchnorm_act import SyncBatchNormAct
from . import _norm_act

TORCH_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
NORMKIT_BATCH_NORMS = (nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d)
TO_NORMKIT: dict[type, type] = {**dict(zip(TORCH_BATCH_NORMS, NORMKIT_BATCH_NORMS, strict=True)),
                                 torch.nn.SyncBatchNorm: nk.SyncBatchNorm}
TO_TORCH: dict[type, type] = {normkit: torch_ for torch_, normkit in TO_NORMKIT.items()}
# normkit's layers with an activation become torch's batch norm followed by torch's activation module.
ACT_TO_TORCH: dict[type, type] = {BatchNormAct1d: torch.nn.BatchNorm1d, BatchNormAct2d: torch.nn.BatchNorm2d,
                                  BatchNormAct3d: torch.nn.BatchNorm3d, SyncBatchNormAct: torch.nn.SyncBatchNorm}

_SOURCES = (*TORCH_BATCH_NORMS, *NORMKIT_BATCH_NORMS, torch.nn.SyncBatchNorm, nk.SyncBatchNorm)


def convert(model: torch.nn.Module, to: str, **kwargs) -> torch.nn.Module:
    r"""Every batch norm under ``model`` becomes the implementation or the normalization named by ``to``.

    .. math::
        \mathrm{convert}(f, \texttt{"normkit"})(x) = \mathrm{convert}(f, \texttt{"torch"})(x) = f(x)

    **Implementations** (``"sync"``, ``"normkit"``, ``"torch"``): the outputs do not change (with ``"sync"``: in
    training they become those of the union of the ranks' batches); parameters and buffers are the same tensor
    objects in the old and the new layers (like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`).
    normkit's ``BatchNormAct1d/2d/3d`` and ``SyncBatchNormAct`` keep their activation: ``"sync"`` gives a
    :class:`normkit.nn.SyncBatchNormAct`, ``"torch"`` gives ``nn.Sequential(torch's BatchNorm, activation)``
    (``nn.ReLU(inplace=True)``, ``nn.SiLU(inplace=True)`` or ``nn.GELU()``; with ``act=None`` the plain
    ``BatchNorm``), whose state_dict keys gain a ``0.`` (``bn.weight`` becomes ``bn.0.weight``) and which takes
    no ``residual=`` argument (a ``forward`` that passes one then fails: keep normkit's layer there), and
    ``"normkit"`` keeps them (it does not fuse a torch batch norm and the activation after it).

    **Normalizations** (a :func:`normkit.nn.norm_layer` spec): every batch norm (torch's and normkit's
    ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and normkit's frozen ones) becomes ``norm_layer(to, C)``, with
    what carries over (a layer with an activation is refused, since the new norm would drop it, except by
    ``"frozen"``):

    - ``"bn"``, ``"bn-biased"``: normkit's ``BatchNorm1d/2d/3d`` of the layer's rank sharing its parameters and
      buffers, with its ``eps``, ``momentum``, ``affine``, ``track_running_stats`` (the running variance keeps its
      value when its convention changes; it is an average of past batches either way);
    - ``"frozen"``: :func:`normkit.tools.freeze` (the ``eval()`` output, values copied, activations kept, undone by
      :func:`normkit.tools.unfreeze`);
    - ``"gnG"``, ``"gn/K"``, ``"ln"``, ``"in"``: the layer's ``weight`` and ``bias`` (the same Parameters, so an
      optimizer built before keeps training them), ``eps``, ``affine`` and ``bias=False``; the running
      statistics do not carry (these norms use the statistics of each sample);
    - ``"brn"``, ``"ghostB"``, ``"cbn"``: batch norms themselves, so the parameters and the running statistics
      carry (the same tensors); a ``"cbn"`` layer still needs ``.bind(conv)`` before it trains with a window;
    - ``"none"``: ``torch.nn.Identity()``.

    GroupNorm, LayerNorm and InstanceNorm layers already in the model are left alone. ``training`` is kept, a
    batch norm at the root returns the new layer, submodules are replaced in place, a layer shared between
    several places stays shared, and layers already of the target kind are kept. Everything is checked before
    anything changes: a spec that does not fit a layer (``"gn32"`` on 48 channels), an unknown spec, a batch
    norm subclass normkit does not know raise and leave the model as it was.

    **Hooks** are kept: the forward hooks, forward pre-hooks and backward hooks registered on a replaced layer
    run on its replacement (the same hook dictionaries, so their handles still remove them; for
    ``nn.Sequential(BatchNorm, activation)`` they sit on the ``Sequential``, whose input and output are the old
    layer's). State_dict hooks registered on a replaced layer are not carried over (they belong to its class's
    format) and a ``UserWarning`` names those layers.

    Args:
        model: any module.
        to: ``"sync"`` (:func:`normkit.tools.sync`; keyword ``process_group``), ``"normkit"`` (torch's
            ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become normkit's), ``"torch"`` (normkit's become
            torch's; a layer with ``running_var="biased"`` raises, since torch cannot store that variance), or a
            :func:`normkit.nn.norm_layer` spec. ``"normkit"`` and ``"torch"`` leave other classes alone, including
            subclasses such as timm's ``BatchNormAct2d`` (``"frozen"`` freezes it, keeping its activation).
        **kwargs: ``process_group`` for ``"sync"``; ``dim`` (1, 2 or 3) for a spec: the rank of the layers that
            do not know theirs (``SyncBatchNorm``, :class:`normkit.nn.FrozenBatchNorm`), needed for ``"bn"``,
            ``"bn-biased"`` and ``"in"`` when the model has such layers.

    Returns:
        ``model``, or the new layer if ``model`` itself was converted.

    Examples::

        >>> import torch, normkit, normkit.tools
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> type(normkit.tools.convert(model, "normkit")[1]).__module__
        'normkit.nn.batchnorm'
        >>> type(normkit.tools.convert(model, "torch")[1]).__module__
        'torch.nn.modules.batchnorm'
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        >>> weight = cnn[1].weight
        >>> cnn = normkit.tools.convert(cnn, "gn32")
        >>> cnn[1], cnn[1].weight is weight
        (GroupNorm(32, 64, eps=1e-05, affine=True, bias=True), True)
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
    spec = parse(to)
    if spec is None:
        raise unknown(to, "convert", "target", "'sync', 'normkit', 'torch', or ")
    caller = f"convert(model, {to!r})"
    dim = kwargs.pop("dim", None)
    if kwargs:
        raise TypeError(f"{caller} takes only the option dim (the rank of SyncBatchNorm and FrozenBatchNorm layers), "
                        f"got {sorted(kwargs)}.")
    if dim is not None and (isinstance(dim, bool) or dim not in (1, 2, 3)):
        raise ValueError(f"{caller}: dim must be 1, 2 or 3 (the BatchNorm1d/2d/3d rank), got {dim!r}.")
    if spec.kind == "frozen":
        return _freeze(model, dim, caller)
    return replace(model, lambda module, _name: _to_spec(module, spec, dim),
                   lambda module, name: _check_spec(module, name, spec, dim, caller))


def _freeze(model: torch.nn.Module, dim: int | None, caller: str) -> torch.nn.Module:
    from .freeze import check_freezable

    def check(module: torch.nn.Module, name: str) -> None:
        if isinstance(module, _BatchNorm):
            check_freezable(module, name, caller)

    def swap(module: torch.nn.Module, _name: str) -> torch.nn.Module:
        return _norm_act.frozen(module, dim) if isinstance(module, _BatchNorm) else module

    return replace(model, swap, check)


def _is_source(module: torch.nn.Module) -> bool:
    if _norm_act.carries_activation(module):  # a norm_layer spec has no activation to keep it in
        return False
    return type(module) in _SOURCES or isinstance(module, FrozenBatchNorm)


def _check_spec(module: torch.nn.Module, name: str, spec: Spec, dim: int | None, caller: str) -> None:
    where = f"layer {name!r}" if name else "the model"
    if _norm_act.carries_activation(module):
        raise TypeError(
            f"{caller}: {where} is a {type(module).__name__} ({_norm_act.describe_activation(module)}); a "
            f"norm_layer({spec.text!r}) layer has no activation, so replacing it would drop it. Replace it yourself "
            "(e.g. normkit.nn.NormAct(norm_layer(...), act)); convert(model, 'frozen'), 'sync' and 'torch' keep "
            "the activation. Nothing was converted."
        )
    if isinstance(module, _BatchNorm) and not _is_source(module):
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise TypeError(f"{caller}: {where} is an uninitialized {type(module).__name__}; its number of features "
                            "is not known yet. Run one forward pass first. Nothing was converted.")
        raise TypeError(
            f"{caller}: {where} is a {type(module).__module__}.{type(module).__name__}, a batch norm subclass "
            "normkit does not know; replacing it would drop what it adds (e.g. the activation of timm's "
            "BatchNormAct2d). Replace it yourself, or convert its library's plain layers. Nothing was converted."
        )
    if not _is_source(module):
        return
    if spec.kind in ("gn", "gn/", "ln"):
        groups(spec, module.num_features, f"{caller}: {where} ({type(module).__name__}({module.num_features}))",
               " Nothing was converted.")
    if spec.kind in ("bn", "bn-biased", "in") and rank_of(module) is None and dim is None:
        raise ValueError(
            f"{caller}: {where} is a {type(module).__name__}, which takes inputs of every rank, so the "
            f"{'InstanceNorm' if spec.kind == 'in' else 'BatchNorm'}1d/2d/3d to build is not known. Pass dim=1, 2 or "
            "3 (e.g. convert(model, ..., dim=2) for images). Nothing was converted."
        )


def _to_spec(module: torch.nn.Module, spec: Spec, dim: int | None) -> torch.nn.Module:
    if not _is_source(module):
        return module
    frozen = isinstance(module, FrozenBatchNorm)
    config = (getattr(module, "_unfrozen_config", None) or _default_config(module)) if frozen else None
    rank = rank_of(module) or dim
    if spec.kind == "none":
        new = torch.nn.Identity()
    elif spec.kind in ("bn", "bn-biased"):
        target = BATCH_NORMS[rank]
        mode = "biased" if spec.kind == "bn-biased" else "unbiased"
        if type(module) is target and module.running_var_mode == mode:
            return module
        nonfinite = config["options"].get("nonfinite", "skip") if frozen else getattr(module, "nonfinite", "skip")
        if frozen:
            return _unfreeze(module, config, target, running_var=mode, nonfinite=nonfinite)
        return rebuild(module, target, running_var=mode, nonfinite=nonfinite)
    else:
        affine = config["affine"] if frozen else module.affine
        has_bias = config["bias"] if frozen else module.bias is not None
        like = next(t for t in (module.weight, module.running_mean, torch.empty(0)) if t is not None)
        new = norm_layer(spec.text, module.num_features, dim=rank or 2, eps=module.eps, affine=affine,
                                 bias=has_bias, device=like.device, dtype=like.dtype)
        if affine:
            weight, bias = module.weight, module.bias
            if frozen:
                weight, bias = (torch.nn.Parameter(t.detach().clone()) for t in (weight, bias))
            new.weight = weight
            if has_bias:
                new.bias = bias
        if isinstance(new, _BatchNorm) and new.running_mean is not None:  # brn, ghost, cbn: statistics carry
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, name, None) is not None:
                    setattr(new, name, getattr(module, name))
    new.training = module.training
    return new


def _swap(module: torch.nn.Module, table: dict[type, type], to: str) -> torch.nn.Module:
    if to == "torch" and type(module) in ACT_TO_TORCH:
        options = {"process_group": module.process_group} if isinstance(module, SyncBatchNormAct) else {}
        return _norm_act.torch_equivalent(module, rebuild(module, ACT_TO_TORCH[type(module)], **options))
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
    if (type(module) in TO_TORCH or type(module) in ACT_TO_TORCH) and module.running_var_mode != "unbiased":
        raise ValueError(
            f"convert(model, 'torch'): {name or 'the model'} ({type(module).__name__}({module.num_features})) "
            "stores the biased variance (running_var='biased'); torch's classes can only store the unbiased one, "
            "so training would change what running_var means. Keep normkit's class there, or rebuild the layer "
            "with running_var='unbiased' first. Nothing was converted."
        )


def rebuild(module: _BatchNorm, target: type, **options) -> torch.nn.Module:
    """A ``target`` layer that shares ``module``'s parameters and buffers and copies its ``training`` flag."""
    new = build(target, module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
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
    shared. A replaced module's forward hooks, forward pre-hooks and backward hooks carry over to its replacement
    (:func:`carry_hooks`); state_dict hooks do not, and a ``UserWarning`` names the layers that had some. Returns
    the (possibly new) root.
    """
    if check is not None:
        for name, module in model.named_modules():
            check(module, name)
    done: dict[int, torch.nn.Module] = {}
    lost: list[str] = []

    def visit(module: torch.nn.Module, name: str) -> torch.nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = swap(module, name)
        done[id(module)] = new
        if new is not module:
            carry_hooks(module, new)
            if _has_user_state_dict_hooks(module):
                lost.append(name or "the model")
        for child_name, child in list(module._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child or new is not module:
                new.add_module(child_name, new_child)
        return new

    root = visit(model, "")
    if lost:
        warnings.warn(
            f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}: the replaced layer had state_dict hooks, "
            "which are specific to its class and were not carried over to the new layer; register them again on "
            "the new layer if they still apply.", UserWarning, stacklevel=3)
    return root


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def carry_hooks(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Give ``new`` the forward hooks, forward pre-hooks and backward hooks of ``old``, the layer it replaces.

    ``new`` takes ``old``'s hook dictionaries themselves, so a handle returned by ``old.register_forward_hook(...)``
    removes the hook from ``new`` too (hooks ``new`` already had join those dictionaries, after ``old``'s). Exact
    for the tools' replacements, which take the same call and return the same output (an implementation swap) or
    the output of the new normalization at the same place (a ``norm_layer`` spec).
    """
    for name in _HOOKS:
        hooks = getattr(old, name, None)
        if not hooks:
            continue
        hooks.update(getattr(new, name, None) or {})
        setattr(new, name, hooks)
    if old._backward_hooks and getattr(new, "_is_full_backward_hook", None) is None:
        new._is_full_backward_hook = old._is_full_backward_hook


def _has_user_state_dict_hooks(module: torch.nn.Module) -> bool:
    """State_dict hooks registered from outside (a class's own, bound to the module, are its class's business)."""
    for name in _STATE_DICT_HOOKS:
        for hook in (getattr(module, name, None) or {}).values():
            owner = getattr(hook, "__self__", None)
            wrapped = getattr(hook, "module", None)  # torch's _WrappedHook(with_module=True): a weakref
            if owner is module or (isinstance(wrapped, weakref.ref) and wrapped() is module):
                continue
            return True
    return False


__all__ = ["carry_hooks", "convert", "layer_tag", "rebuild", "replace"]
