"""Atomic ``load_state_dict`` for normkit's modules: a load that raises leaves them exactly as they were.

torch copies a state_dict key by key and collects the errors (a wrong shape, a non-tensor, a missing or unexpected
key) to raise them together at the end, so a failed ``load_state_dict`` has already overwritten every tensor that
loaded. :class:`AtomicStateLoading` keeps torch's loading code, run once and unchanged (its checks, its legacy
rules such as a missing ``num_batches_tracked``, ``assign=True``, load hooks, its ``RuntimeError`` and message),
and takes the write back when the load fails:

- **Loaded through** ``Module.load_state_dict`` (called on the layer or on any model holding it): when that call is
  going to raise (an error anywhere in the model, or missing/unexpected keys with ``strict=True``), every normkit
  module of the model gets back its parameters and buffers (the same tensor objects, with bit-identical values),
  and so do the plain torch submodules a normkit module holds (``NormAct``'s norm and activation). The decision is
  taken where torch takes it: a ``load_state_dict`` post-hook of the module the call was made on, which runs after
  every module has loaded, just before the strict check. torch's own modules elsewhere in the model are left as
  torch leaves them.
- **Called by another loader** (code calling ``_load_from_state_dict`` itself, as some libraries do): the module's
  own tensors are restored when its own keys add an error (a wrong shape, a non-tensor). Missing and unexpected
  keys are only reported, as torch's ``_load_from_state_dict`` does: torch passes ``strict=True`` there whatever
  the caller wants, so the caller's own rule decides, and a partial load it accepts stays torch's.
- An exception raised inside a normkit module's loading (a load pre-hook on it, say) restores every normkit module
  of that load before it propagates. One raised by another module's code is outside the guarantee.

torch privates touched here (DESIGN.md §2.9; tests/test_atomic_load.py fails when they change): the local names
``self``, ``strict`` and ``error_msgs`` of ``Module.load_state_dict`` (found by walking up the stack, matched by the
identity of ``error_msgs``), the per-module ``_parameters``/``_buffers`` dicts, and the ``OrderedDict`` of
``_load_state_dict_post_hooks`` (whose last entry may be removed while it runs).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict

import torch

_LOAD_STATE_DICT = torch.nn.Module.load_state_dict.__code__


class AtomicStateLoading:
    """Mixin for normkit's modules: ``load_state_dict`` writes all of the module's tensors or none.

    Put it before the torch class in the bases (``class GroupNorm(AtomicStateLoading, torch.nn.GroupNorm)``). A
    successful load runs torch's code once, unchanged, so its result is torch's bit for bit; see the module
    docstring of ``normkit.nn._state_loading`` for what a failed load restores.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load = _enclosing_load(error_msgs)
        if load is None:
            _load_own_part(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs)
            return
        root, load_is_strict = load
        transaction = _LoadTransaction.of(root, load_is_strict, missing_keys, unexpected_keys, error_msgs)
        transaction.snapshots.extend(_Snapshot(module) for module in _own_modules(self))
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        except BaseException:
            transaction.abandon()
            raise


def _load_own_part(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Outside ``Module.load_state_dict``: torch's load of ``module``'s own keys, taken back if they add an error."""
    snapshot = _Snapshot(module)
    errors_before = len(error_msgs)
    try:
        super(AtomicStateLoading, module)._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                                missing_keys, unexpected_keys, error_msgs)
    except BaseException:
        snapshot.restore()
        raise
    if len(error_msgs) > errors_before:
        snapshot.restore()


def _enclosing_load(error_msgs: list) -> tuple[torch.nn.Module, bool] | None:
    """``(the module load_state_dict was called on, its strict)`` for the call collecting into ``error_msgs``.

    torch calls every ``_load_from_state_dict`` with ``strict=True`` and applies the caller's ``strict`` only at
    the end, so the caller's value is read from that call's frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _LOAD_STATE_DICT:
            local = frame.f_locals
            if local.get("error_msgs") is error_msgs:
                return local["self"], bool(local["strict"])
        frame = frame.f_back
    return None


def _own_modules(module: torch.nn.Module):
    """``module`` and the plain torch submodules it holds (normkit submodules take care of themselves)."""
    yield module
    for child in module.children():
        if not isinstance(child, AtomicStateLoading):
            yield from _own_modules(child)


class _LoadTransaction:
    """The modules one ``load_state_dict`` call may write, and the post-hook that restores them when it fails.

    Registered on the module the call was made on: its post-hooks run last, after every module has loaded, and
    right after them torch raises when there are errors, or missing/unexpected keys with ``strict=True``.
    """

    def __init__(self, root: torch.nn.Module, strict: bool, missing_keys: list, unexpected_keys: list,
                 error_msgs: list) -> None:
        self.strict = strict
        self.missing_keys, self.unexpected_keys, self.error_msgs = missing_keys, unexpected_keys, error_msgs
        self.snapshots: list[_Snapshot] = []
        self.handle = root.register_load_state_dict_post_hook(self)

    @classmethod
    def of(cls, root: torch.nn.Module, strict: bool, missing_keys: list, unexpected_keys: list,
           error_msgs: list) -> _LoadTransaction:
        """This load's transaction on ``root``, registered by its first normkit module; older ones are dropped
        (left by a load that an exception cut short, so their post-hook never ran)."""
        for hook in list(root._load_state_dict_post_hooks.values()):
            if isinstance(hook, cls):
                if hook.error_msgs is error_msgs:
                    return hook
                hook.discard(running=False)
        return cls(root, strict, missing_keys, unexpected_keys, error_msgs)

    def __call__(self, module: torch.nn.Module, incompatible_keys) -> None:
        if incompatible_keys.missing_keys is self.missing_keys:
            fails = self.error_msgs or (self.strict and (self.missing_keys or self.unexpected_keys))
            if fails:
                self.restore()
        self.discard(running=True)

    def restore(self) -> None:
        for snapshot in reversed(self.snapshots):  # a module met twice (shared) ends with its first snapshot
            snapshot.restore()

    def abandon(self) -> None:
        """An exception cuts the load short: restore, and unregister (no post-hook loop is running)."""
        self.restore()
        self.discard(running=False)

    def discard(self, running: bool) -> None:
        """Forget the snapshots and unregister. While the post-hooks run, only the last entry of an
        ``OrderedDict`` can go (its iterator has finished); otherwise the next load on the root drops it."""
        self.snapshots = []
        self.missing_keys = self.unexpected_keys = self.error_msgs = None
        hooks = self.handle.hooks_dict_ref()
        if hooks is None:
            return
        if not running or (type(hooks) is OrderedDict and hooks and next(reversed(hooks)) == self.handle.id):
            self.handle.remove()


class _Snapshot:
    """A module's parameters and buffers (objects and values) and extra state, to put back after a failed load."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.parameters = dict(module._parameters)
        self.buffers = dict(module._buffers)
        self.values = [(tensor, tensor._version, tensor.detach().clone())
                       for tensor in (*self.parameters.values(), *self.buffers.values())
                       if tensor is not None and not torch.nn.parameter.is_lazy(tensor)]
        self.has_extra_state = type(module).set_extra_state is not torch.nn.Module.set_extra_state
        self.extra_state = copy.deepcopy(module.get_extra_state()) if self.has_extra_state else None

    def restore(self) -> None:
        module = self.module
        for current, saved in ((module._parameters, self.parameters), (module._buffers, self.buffers)):
            for name, tensor in saved.items():
                if current.get(name) is not tensor:  # assign=True put a new object there
                    current[name] = tensor
        swapping = torch.__future__.get_swap_module_params_on_conversion()
        with torch.no_grad():
            for tensor, version, value in self.values:
                if tensor._version == version and not swapping:  # never written
                    continue
                if (tensor.dtype, tensor.shape, tensor.device, tensor.layout) == (value.dtype, value.shape,
                                                                                   value.device, value.layout):
                    tensor.copy_(value)
                else:  # swap_tensors (torch.__future__) gave the object the checkpoint's dtype
                    if isinstance(tensor, torch.nn.Parameter):
                        value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
                    torch.utils.swap_tensors(tensor, value)
        if self.has_extra_state:
            module.set_extra_state(self.extra_state)


__all__ = ["AtomicStateLoading"]
