"""Frozen batch norms that keep an activation: ``FrozenBatchNormAct*`` (normkit's ``BatchNormAct``) and
``FrozenBatchNormDropAct`` (timm's ``BatchNormAct2d`` layout: ``drop`` and ``act`` modules)."""

from __future__ import annotations

import copy

import torch

from . import _scripting
from .batchnorm_act import ACTIVATIONS, _BatchNormActMixin
from .frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _default_config,
    _unfreeze,
    rank_of,
)


class _FrozenActMixin:
    """``act(frozen_bn(x) + residual)``; everything else is the frozen batch norm's."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, act: str | None = "relu", device=None,
                 dtype=None) -> None:
        _BatchNormActMixin._check_act(act)
        super().__init__(num_features, eps, device=device, dtype=dtype)
        self.act = act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _BatchNormActMixin._check_residual(self, input, residual)
        return _BatchNormActMixin._add_residual_and_act(self, super().forward(input), residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "its forward adds a residual and an activation that a frozen batch norm "
                                  "does not have")

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.Module) -> FrozenBatchNorm:
        r"""A frozen copy of a ``BatchNormAct1d/2d/3d`` or ``SyncBatchNormAct``: its ``eval()`` output, its
        activation, detached copies of its state (see :meth:`normkit.nn.FrozenBatchNorm.from_batch_norm`).

        Called on :class:`FrozenBatchNormAct` it picks the rank of ``bn`` (``BatchNormAct2d`` gives
        :class:`FrozenBatchNormAct2d`, ``SyncBatchNormAct`` the rank-free :class:`FrozenBatchNormAct`).

        Examples::

            >>> import torch, normkit
            >>> bn = normkit.BatchNormAct2d(4, act="silu").eval()
            >>> frozen = normkit.nn.FrozenBatchNormAct.from_batch_norm(bn)
            >>> frozen
            FrozenBatchNormAct2d(4, eps=1e-05, act='silu')
            >>> x = torch.randn(2, 4, 3, 3)
            >>> torch.allclose(frozen(x), bn(x))
            True
        """
        act = getattr(bn, "act", "missing")
        if not isinstance(act, (str, type(None))) or act not in ACTIVATIONS:
            raise TypeError(
                f"{cls.__name__}.from_batch_norm expects normkit's BatchNormAct1d/2d/3d or SyncBatchNormAct (a batch "
                f"norm whose act is 'relu', 'silu', 'gelu' or None), got {type(bn).__name__}. Freeze a plain batch "
                "norm with FrozenBatchNorm.from_batch_norm, a timm-style one (act and drop modules) with "
                "FrozenBatchNormDropAct.from_batch_norm."
            )
        target = cls
        if cls is FrozenBatchNormAct:
            target = _BY_RANK[rank_of(bn)]
        frozen = FrozenBatchNorm.from_batch_norm.__func__(target, bn)
        frozen.act = act
        frozen._unfrozen_config["options"]["act"] = act
        return frozen

    def to_batch_norm(self) -> torch.nn.Module:
        """The trainable ``BatchNormAct1d/2d/3d`` (or ``SyncBatchNormAct``) this layer was frozen from, with its
        current values and activation (see :meth:`normkit.nn.FrozenBatchNorm.to_batch_norm`)."""
        config = getattr(self, "_unfrozen_config", None)
        if config is None:
            from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
            from .syncbatchnorm_act import SyncBatchNormAct

            config = _default_config(self)
            config["cls"] = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d, None: SyncBatchNormAct}[
                rank_of(self)]
        config = {**config, "options": {**config["options"], "act": self.act}}
        return _unfreeze(self, config)


_DOC = r"""Batch normalization with fixed statistics and affine, then an optional residual and an activation.

    .. math::
        y = \mathrm{act}\big(x \cdot s + (\beta - \mathrm{E}[x] \cdot s) + \mathrm{residual}\big), \qquad
        s = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}}

    The frozen form of :class:`normkit.nn.{source}` (what :func:`normkit.tools.freeze` turns it into): a
    :class:`normkit.nn.{base}` (buffers only, the batch norm's state_dict keys, unchanged by ``model.train()`` and
    optimizers) whose ``forward(input, residual=None)`` adds the residual and applies the activation like the
    source layer in ``eval()``. :func:`normkit.tools.unfreeze` gives the ``{source}`` back, activation included.

    Args:
        num_features: :math:`C` from an expected input of size :math:`({shape})`.
        eps: added to the variance inside the square root. Default: ``1e-5``
        act: ``"relu"`` (default), ``"silu"``, ``"gelu"`` (exact, erf) or ``None`` (identity).
        device, dtype: of the buffers.

    Shape:
        - Input: :math:`({shape})`; ``residual``: ``None`` or the input's shape, dtype and device. Output: same.

    Examples::

        >>> import torch, normkit
        >>> frozen = normkit.nn.{name}(4, act="relu")  # a new layer: the identity, then the activation
        >>> x = torch.randn({example})
        >>> torch.equal(frozen(x), torch.relu(x))
        True
"""


def _make(base: type, name: str, source: str, shape: str, example: str) -> type:
    cls = type(name, (_FrozenActMixin, base), {"__module__": __name__})
    doc = _DOC
    for key, value in (("{base}", base.__name__), ("{name}", name), ("{source}", source), ("{shape}", shape),
                       ("{example}", example)):
        doc = doc.replace(key, value)
    cls.__doc__ = doc
    return cls


FrozenBatchNormAct = _make(FrozenBatchNorm, "FrozenBatchNormAct", "SyncBatchNormAct", "N, C, +", "8, 4, 5")
FrozenBatchNormAct1d = _make(FrozenBatchNorm1d, "FrozenBatchNormAct1d", "BatchNormAct1d", "N, C) or (N, C, L",
                             "8, 4")
FrozenBatchNormAct2d = _make(FrozenBatchNorm2d, "FrozenBatchNormAct2d", "BatchNormAct2d", "N, C, H, W", "8, 4, 5, 5")
FrozenBatchNormAct3d = _make(FrozenBatchNorm3d, "FrozenBatchNormAct3d", "BatchNormAct3d", "N, C, D, H, W",
                             "2, 4, 3, 3, 3")

_BY_RANK = {None: FrozenBatchNormAct, 1: FrozenBatchNormAct1d, 2: FrozenBatchNormAct2d, 3: FrozenBatchNormAct3d}


class FrozenBatchNormDropAct(FrozenBatchNorm):
    r"""A frozen batch norm followed by a ``drop`` and an ``act`` module: the frozen form of timm's
    ``BatchNormAct2d`` (and of any batch norm subclass with that layout).

    .. math::
        y = \mathrm{act}\big(\mathrm{drop}(x \cdot s + (\beta - \mathrm{E}[x] \cdot s))\big), \qquad
        s = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}}

    What :func:`normkit.tools.freeze` turns a batch norm with ``act`` and ``drop`` submodules into (timm's
    ``BatchNormAct2d``, ``SyncBatchNormAct``): a :class:`normkit.nn.FrozenBatchNorm` (buffers only, the same
    state_dict keys as the source, the activation's own parameters, such as a ``PReLU``'s, under ``act.``) that
    keeps the source's ``drop`` and ``act`` modules (the same module objects). Input of any rank ``(N, C, +)``.
    :func:`normkit.tools.unfreeze` rebuilds the source's own class (from a parameter-free copy of it kept in
    ``_unfrozen_config``) with the current values and these ``drop`` and ``act`` modules.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`.
        eps: added to the variance inside the square root. Default: ``1e-5``
        act: the activation module; ``None`` is ``torch.nn.Identity()``. Default: ``None``
        drop: the module between the norm and the activation (timm's ``drop_layer``); ``None`` is
            ``torch.nn.Identity()``. Default: ``None``
        device, dtype: of the buffers.

    Shape:
        - Input: :math:`(N, C, +)`. Output: same shape.

    Examples::

        >>> import torch, normkit
        >>> frozen = normkit.nn.FrozenBatchNormDropAct(4, act=torch.nn.SiLU())
        >>> frozen
        FrozenBatchNormDropAct(
          4, eps=1e-05
          (drop): Identity()
          (act): SiLU()
        )
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(frozen(x), torch.nn.functional.silu(x))
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, act: torch.nn.Module | None = None,
                 drop: torch.nn.Module | None = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, device=device, dtype=dtype)
        for what, module in (("act", act), ("drop", drop)):
            if module is not None and not isinstance(module, torch.nn.Module):
                raise TypeError(f"FrozenBatchNormDropAct: {what} must be an nn.Module or None, got "
                                f"{type(module).__name__}. Pass e.g. {what}=torch.nn.ReLU().")
        self.drop = drop if drop is not None else torch.nn.Identity()
        self.act = act if act is not None else torch.nn.Identity()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "its forward applies the drop and act modules after the frozen batch norm")

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.Module) -> FrozenBatchNormDropAct:
        r"""A frozen copy of a batch norm with ``act`` and ``drop`` submodules (timm's ``BatchNormAct2d``): its
        ``eval()`` batch norm, then its own ``drop`` and ``act`` modules (moved, not copied).

        The batch norm's state is cloned as in :meth:`normkit.nn.FrozenBatchNorm.from_batch_norm`; a copy of ``bn``
        without its parameters, buffers and hooks is kept for :meth:`to_batch_norm`.

        Examples::

            >>> import torch, normkit
            >>> class BNAct(torch.nn.BatchNorm2d):  # timm's layout
            ...     def __init__(self, c):
            ...         super().__init__(c)
            ...         self.drop, self.act = torch.nn.Identity(), torch.nn.ReLU()
            ...     def forward(self, x):
            ...         return self.act(self.drop(super().forward(x)))
            >>> frozen = normkit.nn.FrozenBatchNormDropAct.from_batch_norm(BNAct(4))
            >>> type(frozen).__name__, type(frozen.act).__name__, type(frozen.to_batch_norm()).__name__
            ('FrozenBatchNormDropAct', 'ReLU', 'BNAct')
        """
        act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
        if not (isinstance(act, torch.nn.Module) and isinstance(drop, torch.nn.Module)):
            raise TypeError(
                f"{cls.__name__}.from_batch_norm expects a batch norm with act and drop submodules (timm's "
                f"BatchNormAct2d layout), got {type(bn).__name__} with act={type(act).__name__}, "
                f"drop={type(drop).__name__}. Freeze a plain batch norm with FrozenBatchNorm.from_batch_norm."
            )
        frozen = FrozenBatchNorm.from_batch_norm.__func__(cls, bn)
        frozen.drop, frozen.act = drop, act
        frozen._unfrozen_config["template"] = _skeleton(bn)
        return frozen

    def to_batch_norm(self) -> torch.nn.Module:
        """The trainable layer this one was frozen from (its class, options and ``requires_grad`` flags), with this
        layer's current values (cloned), ``training`` flag and ``drop``/``act`` modules.

        A layer built directly (not by :meth:`from_batch_norm`) does not know which class to become and raises.
        """
        template = (getattr(self, "_unfrozen_config", None) or {}).get("template")
        if template is None:
            raise TypeError(
                "FrozenBatchNormDropAct.to_batch_norm: this layer was built directly, not frozen from a batch norm, so "
                "the class to rebuild is not known. Build that layer yourself and load this layer's state_dict into "
                "it (the keys are the same)."
            )
        new = copy.deepcopy(template)
        requires_grad = iter(self._unfrozen_config["requires_grad"])
        with torch.no_grad():
            for name in ("weight", "bias"):
                if name in new._parameters and new._parameters[name] is not None:
                    new._parameters[name] = torch.nn.Parameter(getattr(self, name).detach().clone(),
                                                               requires_grad=next(requires_grad, True))
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if name in new._buffers and new._buffers[name] is not None:
                    new._buffers[name] = getattr(self, name).detach().clone()
        left = [name for name, t in (*new._parameters.items(), *new._buffers.items()) if t is not None and t.is_meta]
        if left:
            raise TypeError(
                f"FrozenBatchNormDropAct.to_batch_norm: {type(new).__name__} has state a frozen batch norm does not "
                f"keep ({', '.join(left)}), so it cannot be rebuilt exactly. Rebuild it yourself and load this "
                "layer's state_dict."
            )
        new.drop, new.act = self.drop, self.act
        new.training = self.training
        return new


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _skeleton(bn: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``bn`` with its parameters and buffers on the meta device, no submodules and no forward/backward
    hooks: the class and options :meth:`FrozenBatchNormDropAct.to_batch_norm` rebuilds from."""
    # deepcopy's memo stands in empty containers for the submodules (the act and drop modules move to the frozen
    # layer) and the hooks (tools.replace moves them), so ``bn`` itself is not touched.
    memo = {id(bn._modules): {}}
    for name in _HOOKS:
        hooks = getattr(bn, name, None)
        if hooks is not None:
            memo[id(hooks)] = type(hooks)()
    skeleton = copy.deepcopy(bn, memo)
    return skeleton.to(device="meta")


__all__ = ["FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
           "FrozenBatchNormDropAct"]
