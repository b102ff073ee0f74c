"""``fold(model)``: fold every eval batch norm into the convolution or linear layer that feeds it.

Which pairs fold is decided on the model's ``torch.fx`` graph when the model can be traced (the rules of
``torch.fx.experimental.optimization.fuse``), else on ``nn.Sequential`` adjacency. Either way the folding itself
happens in the module tree: the layer gets the folded weight and bias, the batch norm becomes ``nn.Identity`` (or the
activation it carried), and the model keeps its own class, attributes and ``forward``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm import _BatchNormMixin
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d
from ..nn.frozen_act import FrozenBatchNormDropAct, _FrozenActMixin
from . import _norm_act

# Layers a batch norm folds into, by exact type (a subclass may change what its forward does, as torch's fx fusion
# assumes too). Their output channels are dimension 1 of the output, except Linear's, whose features are the last
# dimension: a Linear folds into a BatchNorm1d only on ``(N, C)`` batches, where the two coincide.
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = (*_CONVS, *_TRANSPOSED, nn.Linear)
# A batch norm folds when its eval forward is the plain one: torch's, normkit's, or a subclass that keeps it.
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, _BatchNormMixin.forward)
# What folds: the batch norms, and normkit's frozen ones (what normkit.tools.freeze leaves), whose forward is the
# same eval affine map whatever the module's training flag.
_NORMS = (_BatchNorm, FrozenBatchNorm)


@dataclass
class FoldReport:
    """What :func:`fold` did: the pairs it folded, the batch norms it kept and why, and how it found them.

    Attributes:
        folded: ``(layer name, batch norm name)`` pairs, in model order.
        kept: ``(batch norm name, reason)`` for every batch norm left in the model.
        method: ``"fx"`` (the traced graph decided) or ``"sequential"`` (adjacent children of ``nn.Sequential``
            containers, used when the model cannot be traced).
        trace_error: why tracing failed when ``method == "sequential"``, else ``None``.
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    method: str = "fx"
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"fold ({self.method}): {len(self.folded)} batch norm(s) folded, {len(self.kept)} kept"]
        if self.trace_error is not None:
            lines.append(f"  the model could not be traced ({self.trace_error}); only nn.Sequential neighbours "
                         "were considered")
        lines += [f"  folded {bn} into {layer}" for layer, bn in self.folded]
        lines += [f"  kept {bn}: {reason}" for bn, reason in self.kept]
        return "\n".join(lines)


def fold(model: nn.Module, *, report: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    r"""A copy of an eval model with every batch norm folded into the convolution or linear layer before it.

    .. math::
        W' = W \cdot \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        b' = (b - \mu) \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta

    per output channel, with :math:`\mu, \sigma^2` the running statistics. A batch norm folds when it directly
    follows a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any ``groups``) or ``Linear`` (then a ``BatchNorm1d`` on
    ``(N, C)`` batches) whose output nothing else uses, tracks running statistics, is a plain batch norm (torch's or
    normkit's, ``SyncBatchNorm`` and the ``FrozenBatchNorm*d`` of :func:`normkit.tools.freeze` included), and neither
    module carries hooks nor is called twice. Batch norms with an activation fold too and leave the activation where
    they stood: normkit's ``BatchNormAct1d/2d/3d``, ``SyncBatchNormAct`` and ``FrozenBatchNormAct*`` become
    :class:`normkit.nn.ResidualAct` (the same ``act`` and ``residual=`` argument; a call with a residual still
    folds), and a batch norm subclass with ``act`` and ``drop`` submodules (timm's ``BatchNormAct2d``, recognised
    by those attributes and taken to compute ``act(drop(bn(x)))``) and :class:`normkit.nn.FrozenBatchNormDropAct`
    become :class:`normkit.nn.NormAct` ``(Identity(), act, drop)`` holding the layer's own modules. A traceable model
    (``torch.fx.symbolic_trace``) is analysed on its graph, so residual adds, concatenations and arbitrary
    ``forward`` code are handled; an untraceable one falls back to adjacent children of ``nn.Sequential``
    containers, and the report says so. The layer gains a bias if it had none, a plain batch norm becomes
    ``nn.Identity``, the arithmetic runs in float64 and is cast back to the layer's dtype. Outputs equal those of
    the unfolded eval model up to rounding (about 1e-6 in float32).

    ``model`` itself is never changed: folding rewrites weights, so the result is a deep copy that keeps the
    model's class, ``forward`` and attributes (only folded batch norms are replaced).

    Args:
        model: a model in eval mode (``model.eval()``); training mode raises, since a training batch norm
            normalizes with batch statistics that no fixed weight can express.
        report: also return a :class:`FoldReport` of what was folded, what was kept and why. Default: ``False``.

    Returns:
        The folded copy, or ``(copy, FoldReport)`` with ``report=True``.

    Examples::

        >>> import torch, normkit
        >>> from normkit.tools.fold import fold
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), normkit.BatchNorm2d(8),
        ...                             torch.nn.ReLU()).eval()
        >>> folded, what = fold(model, report=True)
        >>> folded
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> what.folded
        [('0', '1')]
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}.")
    training = [name or "the model" for name, m in model.named_modules()
                if m.training and (m is model or isinstance(m, (_BatchNorm, *_LAYERS)))]
    if training:
        raise ValueError(
            f"fold needs a model in eval mode, but {', '.join(training[:3])}{' ...' if len(training) > 3 else ''} "
            "is in training mode: a training batch norm normalizes with each batch's statistics, which no fixed "
            "weight can express. Call model.eval() first. Nothing was changed."
        )
    try:
        folded = copy.deepcopy(model)
    except Exception as error:
        raise TypeError(
            f"fold works on a copy of the model, and copy.deepcopy failed ({type(error).__name__}: {error}); "
            "make the model deep-copyable (or fold a copy you made yourself). Nothing was changed."
        ) from error
    result = FoldReport()
    names = _names(folded)
    try:
        pairs, kept = _pairs_from_graph(folded, names)
    except Exception as error:  # anything symbolic tracing cannot follow: data-dependent control flow, ...
        result.method, result.trace_error = "sequential", f"{type(error).__name__}: {_first_line(error)}"
        pairs, kept = _pairs_from_sequentials(folded, names)
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        _fold_into(layer, bn)
        _set_submodule(folded, bn_name, _norm_act.fold_remnant(bn))
        result.folded.append((layer_name, bn_name))
    result.kept = kept
    return (folded, result) if report else folded


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


def _names(model: nn.Module) -> dict[int, list[str]]:
    """Every dotted name of every module (a module reachable under several names lists them all)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _is_foldable_bn(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNormDropAct):
        return type(module).forward is FrozenBatchNormDropAct.forward
    if isinstance(module, _FrozenActMixin):
        return type(module).forward is _FrozenActMixin.forward
    if isinstance(module, FrozenBatchNorm):
        return type(module).forward is FrozenBatchNorm.forward
    if _norm_act.carries_activation(module):  # normkit's (exact types) and timm's layout: bn, then drop and act
        return True
    return isinstance(module, _BatchNorm) and type(module).forward in _PLAIN_FORWARDS


def _takes_only_the_layer_output(node: torch.fx.Node, bn: nn.Module) -> bool:
    """The call passes one input (normkit's activation layers: and optionally their ``residual``)."""
    if len(node.args) == 1 and not node.kwargs:
        return True
    if not _norm_act.is_normkit_act(bn):
        return False
    return (len(node.args) == 2 and not node.kwargs) or (len(node.args) == 1 and set(node.kwargs) == {"residual"})


def _why_not(layer: nn.Module, bn: nn.Module, names: dict[int, list[str]]) -> str | None:
    """Why ``bn`` cannot fold into ``layer`` (that feeds only it), or ``None`` when it can."""
    if type(layer) not in _LAYERS:
        return f"its input comes from {type(layer).__name__}, not a Conv, ConvTranspose or Linear"
    if not getattr(bn, "track_running_stats", True) or bn.running_mean is None or bn.running_var is None:
        return "it does not track running statistics (it normalizes with batch statistics even in eval)"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"{type(layer).__name__} gives {channels} channels but the batch norm has {bn.num_features}"
    if isinstance(layer, nn.Linear) and not isinstance(bn, (nn.BatchNorm1d, FrozenBatchNorm1d)):
        return "a Linear folds only into a BatchNorm1d"
    for module, what in ((layer, "layer"), (bn, "batch norm")):
        if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None):
            return f"the {what} has hooks, which folding would bypass or change"
        if len(names[id(module)]) > 1:
            return f"the {what} is registered under several names ({', '.join(names[id(module)])}), so it is shared"
    return None


class _Tracer(torch.fx.Tracer):
    """Stops at batch norms and foldable layers (normkit's classes live outside ``torch.nn``)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_NORMS, *_LAYERS)) or super().is_leaf_module(m, qualname)


def _pairs_from_graph(model: nn.Module, names: dict[int, list[str]]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing may warn about code it cannot see; the report covers it
        graph = _Tracer().trace(model)
    calls: dict[str, int] = {}
    touched: set[str] = set()  # modules whose parameters or buffers the graph reads directly
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            touched.add(node.target.rpartition(".")[0])
    pairs, kept, seen = [], [], set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _NORMS):
            continue
        seen.add(id(bn))
        reason = _graph_reason(model, node, calls, touched, names)
        if reason is None:
            pairs.append((node.args[0].target, node.target))
        elif (node.target, reason) not in kept:
            kept.append((node.target, reason))
    for name, module in model.named_modules():
        if isinstance(module, _NORMS) and id(module) not in seen:
            kept.append((name, "it is not called in the traced forward"))
    return pairs, kept


def _graph_reason(model, node, calls, touched, names) -> str | None:
    bn = model.get_submodule(node.target)
    if not _is_foldable_bn(bn):
        return f"{type(bn).__name__} overrides forward, so it is not a plain batch norm"
    if calls[node.target] > 1:
        return "the batch norm is called more than once in forward"
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or source.op != "call_module":
        return "its input is not the output of a module"
    if not _takes_only_the_layer_output(node, bn):
        return "it is called with more than its input"
    layer = model.get_submodule(source.target)
    if type(layer) in _LAYERS:
        if len(source.users) > 1:
            return f"the output of {source.target} has {len(source.users)} users, not only this batch norm"
        if source in (*node.args[1:], *node.kwargs.values()):
            return f"the output of {source.target} is also the residual of this batch norm"
        if calls[source.target] > 1:
            return f"{source.target} is called more than once in forward"
        if source.target in touched or node.target in touched:
            return "forward reads the parameters of the layer or of the batch norm directly"
    reason = _why_not(layer, bn, names)
    return None if reason is None else reason


def _pairs_from_sequentials(model: nn.Module, names: dict[int, list[str]]):
    pairs, kept, paired = [], [], set()
    for parent_name, parent in model.named_modules():
        if type(parent).forward is not nn.Sequential.forward:
            continue
        children = list(parent.named_children())
        for (layer_name, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not isinstance(bn, _NORMS) or type(layer) not in _LAYERS:
                continue
            full = f"{parent_name}.{bn_name}" if parent_name else bn_name
            reason = ("it is not a plain batch norm" if not _is_foldable_bn(bn) else _why_not(layer, bn, names))
            if reason is None:
                pairs.append((f"{parent_name}.{layer_name}" if parent_name else layer_name, full))
                paired.add(id(bn))
            else:
                kept.append((full, reason))
    listed = {name for name, _ in kept}
    for name, module in model.named_modules():
        if isinstance(module, _NORMS) and id(module) not in paired and name not in listed:
            kept.append((name, "the model could not be traced and this batch norm does not directly follow a "
                               "Conv/ConvTranspose/Linear inside an nn.Sequential"))
    return pairs, kept


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval affine map into ``layer``'s weight and bias, in place (float64 arithmetic)."""
    wide = torch.float64
    scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    shift = -bn.running_mean.to(wide) * scale
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
        shift = shift * bn.weight.to(wide)
    if bn.bias is not None:
        shift = shift + bn.bias.to(wide)
    weight = layer.weight.to(wide)
    if isinstance(layer, _TRANSPOSED):  # weight (in, out / groups, *k): output channel g * out/g + j
        groups = layer.groups
        shape = (groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        per_out = scale.view(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        new_weight = (weight.view(shape) * per_out).view(weight.shape)
    else:  # weight (out, ...)
        new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    old_bias = layer.bias.to(wide) if layer.bias is not None else torch.zeros_like(scale)
    new_bias = old_bias * scale + shift
    layer.weight.copy_(new_weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


__all__ = ["FoldReport", "fold"]
