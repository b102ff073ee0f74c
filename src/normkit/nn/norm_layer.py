"""``norm_layer(spec, num_features)``: one string grammar for the normalization family."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._state_loading import AtomicStateLoading
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .cross_iteration import CrossIterationBatchNorm2d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .normalization import GroupNorm
from .syncbatchnorm import SyncBatchNorm

GRAMMAR = ("'bn', 'bn-biased', 'frozen', 'sync', 'gnG' (G groups, e.g. 'gn32'), 'gn/K' (K channels per group, "
           "e.g. 'gn/16'), 'ln', 'in', 'brn', 'ghostB' (virtual batch size B, e.g. 'ghost32'), 'cbn', 'none'")
_EXAMPLES = ("bn", "bn-biased", "frozen", "sync", "gn32", "gn/16", "ln", "in", "brn", "ghost32", "cbn", "none")
_PATTERN = re.compile(r"^(?:(bn|bn-biased|frozen|sync|ln|in|brn|cbn|none)|gn(\d+)|gn/(\d+)|ghost(\d+))$")
BATCH_NORMS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_INSTANCE_NORMS = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}
_RENORMS = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_GHOSTS = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}


@dataclass(frozen=True)
class Spec:
    """A parsed ``norm_layer`` spec: ``kind`` is the spec without its number (``"gn"``, ``"gn/"``, ``"ghost"``, or
    the whole spec), ``number`` the groups, channels per group or virtual batch size."""

    text: str
    kind: str
    number: int | None = None


def parse(spec) -> Spec | None:
    """The parsed ``spec``, or ``None`` if it is not in the grammar; raises ``ValueError`` for a zero number."""
    match = _PATTERN.match(spec) if isinstance(spec, str) else None
    if match is None:
        return None
    if match[1]:
        return Spec(spec, match[1])
    kind, number = next((k, int(v)) for k, v in zip(("gn", "gn/", "ghost"), match.groups()[1:], strict=True) if v)
    if number == 0:
        what = {"gn": "number of groups", "gn/": "number of channels per group", "ghost": "virtual batch size"}[kind]
        raise ValueError(f"norm_layer spec {spec!r}: the {what} must be positive, got 0. E.g. 'gn32', 'gn/16', "
                         "'ghost32'.")
    return Spec(spec, kind, number)


def unknown(spec, caller: str, what: str = "spec", also: str = "") -> ValueError:
    """The error for a string outside the grammar, with the closest valid spec when there is one."""
    close = difflib.get_close_matches(spec.lower(), _EXAMPLES, n=1) if isinstance(spec, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{caller}: unknown {what} {spec!r}; expected {also}a norm_layer spec: {GRAMMAR}.{hint}")


def groups(spec: Spec, num_features: int, context: str = "", after: str = "") -> int:
    """The number of groups of a ``gnG``, ``gn/K`` or ``ln`` spec for ``num_features`` channels, or a ``ValueError``
    that names the channel count and the specs that would fit."""
    if spec.kind == "ln":
        return 1
    per_group = spec.kind == "gn/"
    if num_features % spec.number == 0:
        return num_features // spec.number if per_group else spec.number
    divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
    below = max(d for d in divisors if d < spec.number)
    above = [d for d in divisors if d > spec.number]
    prefix = "gn/" if per_group else "gn"
    fits = " or ".join(repr(f"{prefix}{d}") for d in [below, *above[:1]])
    if per_group:
        need = f"{spec.number} channels per group need a channel count divisible by {spec.number}"
    else:
        need = f"GroupNorm({spec.number}, C) needs a channel count C divisible by {spec.number}"
        if num_features % 16 == 0:
            fits = f"'gn/16' ({num_features // 16} groups of 16 channels) or " + fits
    context = context or f"norm_layer({spec.text!r}, {num_features})"
    raise ValueError(f"{context}: {need}, got C={num_features}. Use {fits} (divisors of {num_features}), or "
                     f"another norm.{after}")


def norm_layer(spec: str, num_features: int, *, dim: int = 2, **kwargs) -> torch.nn.Module:
    r"""The normalization layer named by ``spec`` for ``num_features`` channels, inputs :math:`(N, C, *)`.

    ====================  ==============================================================================
    spec                  module
    ====================  ==============================================================================
    ``"bn"``              ``normkit.nn.BatchNorm{dim}d`` ``(C)``
    ``"bn-biased"``       ``normkit.nn.BatchNorm{dim}d`` ``(C, running_var="biased")`` (Keras, Flax)
    ``"frozen"``          ``normkit.nn.FrozenBatchNorm{dim}d`` ``(C)``
    ``"sync"``            :class:`normkit.nn.SyncBatchNorm` ``(C)``
    ``"gnG"``             :class:`normkit.nn.GroupNorm` ``(G, C)``: ``"gn32"`` is the GN paper's 32 groups
    ``"gn/K"``            :class:`normkit.nn.GroupNorm` ``(C // K, C)``: ``K`` channels per group (``"gn/16"``)
    ``"ln"``              :class:`normkit.nn.GroupNorm` ``(1, C)``: normalizes each sample over :math:`(C, *)`, the
                          GN paper's LayerNorm; on an :math:`(N, C)` input it equals ``LayerNorm(C)``
                          (not ConvNeXt's ``LayerNorm2d``, which normalizes over :math:`C` per position)
    ``"in"``              ``normkit.nn.InstanceNorm{dim}d`` ``(C, affine=True)``
    ``"none"``            ``torch.nn.Identity()`` (``kwargs`` are ignored)
    ``"brn"``             ``normkit.nn.BatchRenorm{dim}d`` ``(C)`` (Ioffe 2017, the paper's schedule)
    ``"ghostB"``          ``normkit.nn.GhostBatchNorm{dim}d`` ``(C, B)``: ghost batches of ``B`` samples
    ``"cbn"``             :class:`normkit.nn.CrossIterationBatchNorm2d` ``(C)`` (``dim=2`` only); bind the
                          preceding layer with ``.bind(conv)`` before training with a window above 1
    ====================  ==============================================================================

    normkit's GroupNorm and InstanceNorm subclass torch's: same arguments, repr and state_dict.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta
        \quad\text{(the statistics over the dimensions the spec names)}

    Args:
        spec: a string of the grammar above.
        num_features: the channel count :math:`C`.
        dim: the rank of the input's spatial part, 1 (``(N, C)`` or ``(N, C, L)``), 2 (images) or 3 (volumes);
            picks the ``1d``/``2d``/``3d`` class where the spec has one. Default: ``2``
        **kwargs: passed to the module's constructor (``eps``, ``momentum``, ``affine``, ``device``, ``dtype``, ...).

    Examples::

        >>> import normkit
        >>> normkit.nn.norm_layer("gn32", 64)
        GroupNorm(32, 64, eps=1e-05, affine=True, bias=True)
        >>> normkit.nn.norm_layer("gn/16", 64)
        GroupNorm(4, 64, eps=1e-05, affine=True, bias=True)
        >>> normkit.nn.norm_layer("bn-biased", 8, dim=1)
        BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, running_var='biased')
    """
    parsed = parse(spec)
    if parsed is None:
        raise unknown(spec, "norm_layer")
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"norm_layer({spec!r}, ...): num_features must be a positive int (the channel count C), "
                         f"got {num_features!r}.")
    if dim not in (1, 2, 3) or isinstance(dim, bool):
        raise ValueError(f"norm_layer({spec!r}, ...): dim must be 1, 2 or 3 (the BatchNorm1d/2d/3d rank), got "
                         f"{dim!r}.")
    kind = parsed.kind
    if kind == "none":
        return torch.nn.Identity()
    if kind in ("bn", "bn-biased"):
        if kind == "bn-biased":
            kwargs = {"running_var": "biased", **kwargs}
        return BATCH_NORMS[dim](num_features, **kwargs)
    if kind == "frozen":
        return FROZEN[dim](num_features, **kwargs)
    if kind == "sync":
        return SyncBatchNorm(num_features, **kwargs)
    if kind == "in":
        return _INSTANCE_NORMS[dim](num_features, **{"affine": True, **kwargs})
    if kind == "brn":
        return _RENORMS[dim](num_features, **kwargs)
    if kind == "ghost":
        return _GHOSTS[dim](num_features, parsed.number, **kwargs)
    if kind == "cbn":
        if dim != 2:
            raise ValueError(f"norm_layer('cbn', {num_features}, dim={dim}): cross-iteration batch norm exists for "
                             "images only (CrossIterationBatchNorm2d); use dim=2, or another spec such as 'bn'.")
        return CrossIterationBatchNorm2d(num_features, **kwargs)
    return GroupNorm(groups(parsed, num_features), num_features, **kwargs)


_BATCH_NORM_ACTS = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_FUSED_ACTS = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.GELU: "gelu", "relu": "relu", "silu": "silu",
               "gelu": "gelu"}
_NAMED_ACTS = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU}
_UNSET = object()


class NormAct(AtomicStateLoading, torch.nn.Module):
    """``act(drop(norm(x)))``: a normalization layer followed by an activation (and optional dropout), the module
    :func:`norm_factory` builds for timm's norm-act convention when no fused normkit layer fits.

    Args:
        norm: the normalization layer (its parameters and buffers are under ``norm.``).
        act: the activation module, or ``None`` (identity).
        drop: a module applied between the two (timm's ``drop_layer``), or ``None``.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape.
    """

    def __init__(self, norm: torch.nn.Module, act: torch.nn.Module | None = None,
                 drop: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else torch.nn.Identity()
        self.act = act if act is not None else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def norm_factory(spec: str, *, dim: int = 2, act_layer=None, **kwargs) -> Callable[..., torch.nn.Module]:
    r"""A ``norm_layer=`` callable for torchvision and timm model builders: ``norm_factory(spec)(C)`` is
    ``norm_layer(spec, C)``.

    torchvision's builders (``resnet50(norm_layer=...)``, ``BasicBlock``, ``ConvNormActivation``) and timm's
    (``timm.create_model(..., norm_layer=...)``) take a ``norm_layer: Callable[..., nn.Module]`` and call it as
    ``norm_layer(num_features)``; timm adds ``device=``/``dtype=``, which go to the module's constructor. The
    returned callable is a plain function (not a ``functools.partial``): timm's ``get_norm_layer`` and
    ``get_norm_act_layer`` unbind a partial's *keywords* only and would drop the spec, and accept only
    functions, classes, partials and strings.

    timm's norm-act convention, ``norm_layer(C, apply_act=True, act_layer=None, act_kwargs=None, inplace=None,
    drop_layer=None)`` (``ConvNormAct``, ``create_norm_act_layer``; timm calls a function as is, without binding
    its ``act_layer``, so give the activation here with ``act_layer=``) is taken too: without an activation
    (``apply_act=False`` or ``act_layer=None``) and dropout the result is the plain layer; ``"bn"``/``"bn-biased"``
    with ReLU, SiLU or GELU (``torch.nn.ReLU``, ``torch.nn.SiLU``, ``torch.nn.GELU`` with its defaults, or
    ``"relu"``/``"silu"``/``"gelu"``) and no dropout
    is the fused :class:`normkit.nn.BatchNormAct2d` (a batch norm's state_dict, like timm's ``BatchNormAct2d``);
    anything else is :class:`NormAct` ``(layer, act, drop)`` (parameters under ``norm.``).

    Args:
        spec: a :func:`norm_layer` spec (``"bn"``, ``"gn32"``, ``"gn/16"``, ``"frozen"``, ...).
        dim: 1, 2 or 3, as in :func:`norm_layer`. Default: ``2``
        act_layer: the activation for the norm-act convention: a module class or function returning a module
            (``torch.nn.ReLU``), or ``"relu"``, ``"silu"``, ``"gelu"``. Default: ``None``
        **kwargs: constructor arguments of every layer (``eps``, ``momentum``, ...); a call's own keywords win.

    Returns:
        ``build(num_features, **overrides) -> nn.Module``, a function named after the spec.

    Examples::

        >>> import normkit
        >>> gn = normkit.nn.norm_factory("gn32")
        >>> gn(64)
        GroupNorm(32, 64, eps=1e-05, affine=True, bias=True)
        >>> normkit.nn.norm_factory("bn", eps=1e-3)(8, momentum=0.01)
        BatchNorm2d(8, eps=0.001, momentum=0.01, affine=True, bias=True, track_running_stats=True)
        >>> normkit.nn.norm_factory("bn", act_layer="silu")(8).act
        'silu'
    """
    parsed = parse(spec)
    if parsed is None:
        raise unknown(spec, "norm_factory")
    if dim not in (1, 2, 3) or isinstance(dim, bool):
        raise ValueError(f"norm_factory({spec!r}): dim must be 1, 2 or 3 (the BatchNorm1d/2d/3d rank), got {dim!r}.")
    _check_act(act_layer, spec)
    defaults = dict(kwargs)
    factory_act = act_layer

    def build(num_features: int, *, apply_act: bool = True, act_layer=_UNSET, act_kwargs: dict | None = None,
              inplace: bool | None = None, drop_layer=None, **overrides) -> torch.nn.Module:
        act = factory_act if act_layer is _UNSET else act_layer
        _check_act(act, spec)
        options = {**defaults, **overrides}
        if not apply_act:
            act = None
        fused = _FUSED_ACTS.get(act) if isinstance(act, (str, type)) else None
        if drop_layer is None and fused is not None and not act_kwargs and parsed.kind in ("bn", "bn-biased"):
            if parsed.kind == "bn-biased":
                options = {"running_var": "biased", **options}
            if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
                norm_layer(spec, num_features)  # the same error as without the activation
            return _BATCH_NORM_ACTS[dim](num_features, act=fused, **options)
        layer = norm_layer(spec, num_features, dim=dim, **options)
        if act is None and drop_layer is None:
            return layer
        return NormAct(layer, _activation(act, act_kwargs, inplace), drop_layer() if drop_layer else None)

    build.__name__ = build.__qualname__ = f"norm_factory({spec!r})"
    build.__doc__ = f"``norm_layer({spec!r}, num_features, dim={dim})``: see :func:`normkit.nn.norm_factory`."
    return build


def _check_act(act, spec: str) -> None:
    if act is None or act is _UNSET or callable(act) or (isinstance(act, str) and act in _NAMED_ACTS):
        return
    raise ValueError(f"norm_factory({spec!r}): expected act_layer to be None, a module class such as torch.nn.ReLU, "
                     f"or one of {tuple(_NAMED_ACTS)}, got {act!r}.")


def _activation(act, act_kwargs: dict | None, inplace: bool | None) -> torch.nn.Module | None:
    if act is None:
        return None
    maker = _NAMED_ACTS[act] if isinstance(act, str) else act
    options = dict(act_kwargs or {})
    if inplace is not None:
        try:
            return maker(inplace=inplace, **options)
        except TypeError:  # torch.nn.GELU, SiLU-like classes without ``inplace``: timm drops it the same way
            pass
    return maker(**options)


__all__ = ["BATCH_NORMS", "FROZEN", "GRAMMAR", "NormAct", "Spec", "groups", "norm_factory", "norm_layer", "parse",
           "unknown"]
