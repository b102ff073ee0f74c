"""The doctor: rules for the classic batch-norm mistakes, on the module tree and on one forward pass."""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..nn.normalization import GroupNorm
from ._report import SEVERITIES, Finding, Report, _name_list

#: Rule ids (contract) with their default severity and a one-line description.
RULES: dict[str, tuple[str, str]] = {
    "train-mode-inference": ("error", "BN in training mode when the model is checked for inference"),
    "small-batch": ("warning", "per-replica batch under 8 reaching a BN in training"),
    "bn-after-dropout": ("warning", "Dropout feeding a BN"),
    "bn-before-output": ("warning", "BN as (or right before) the model's output"),
    "bias-before-bn": ("info", "Conv/Linear with bias directly followed by BN (the bias cancels)"),
    "frozen-stats-updating": ("warning", "frozen γ/β but training mode: running statistics still change"),
    "torch-momentum-keras-value": ("error", "torch momentum >= 0.5, a Keras value pasted into torch"),
    "eps-too-small": ("warning", "eps below what the dtype represents usefully (error when <= 0)"),
    "dead-channels": ("warning", "running variance collapsed (error: non-finite running statistics)"),
    "bn-in-recurrence": ("warning", "one BN called more than once per forward"),
    "sync-bn-missing": ("warning", "plain BN under data parallelism with a small per-replica batch"),
    "bn-effect-removed": ("info", "BN feeding another BN or an InstanceNorm, which undoes its γ/β"),
    "forward-failed": ("error", "the forward pass on the example input raised"),
}

MIN_BATCH = 8
SYNC_MIN_BATCH = 32

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Softmax, nn.LogSoftmax,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: Modules that pass their input's structure through (element-wise or reshaping): walked through when asking
#: "what feeds this BN" or "what produces the output".
_PASS_THROUGH = (*_ACTIVATIONS, *_DROPOUTS, nn.Identity, nn.Flatten)
_BIASED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_GROUP_COUNTS = (32, 16, 8, 4, 2, 1)
#: A GroupNorm suggestion keeps at least this many channels per group (fewer is InstanceNorm-like).
_MIN_CHANNELS_PER_GROUP = 4


def doctor(model: nn.Module, example_input=None, *, mode: str | None = None, fix: bool = False,
           convert_small_batch: bool = False, world_size: int | None = None) -> Report:
    """Check a model for the classic batch-norm mistakes and return a :class:`Report`.

    Static rules read the module tree (types, flags, hyper-parameters, running statistics). With
    ``example_input`` the doctor also runs one forward pass, under ``torch.no_grad()`` on a deep copy with the
    global RNG forked, and records with forward hooks which module runs, how often, on what batch, and which
    module's output tensor (by identity) is which module's input. Without an example input, "feeds" comes from
    ``nn.Sequential`` order only. The model's parameters, buffers (running statistics and
    ``num_batches_tracked`` included), ``training`` flags and ``requires_grad`` stay exactly as they were unless
    ``fix=True``.

    Args:
        model: any ``nn.Module``; every subclass of ``torch.nn.modules.batchnorm._BatchNorm`` (torch's and
            normkit's BatchNorm1d/2d/3d, SyncBatchNorm) is checked.
        example_input: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments for
            ``model(...)``; its first dimension is taken as the per-replica batch. Default ``None``: static only.
        mode: ``"train"`` or ``"inference"``: the use the model is checked for. Default ``None`` takes
            ``model.training``. For ``"train"`` on a model in eval mode, the forward runs after ``.train()``
            (on the copy), as a training loop would.
        fix: apply the safe fixes to ``model`` in place and list them in ``Report.changes``: drop a bias that
            a following BN cancels (its value moves into ``running_mean``, so outputs stay the same; rebuild
            the optimizer afterwards), and ``.eval()`` the BNs found in training mode for inference (the BNs
            only: Dropout and the other modules keep their flag).
        convert_small_batch: with ``fix=True``, also replace each BN that saw a batch under 8 (and spatial
            inputs) by ``normkit.nn.GroupNorm`` with γ/β copied. This changes what the model computes.
        world_size: the number of data-parallel replicas; default: ``torch.distributed``'s world size when it
            is initialized, else 1. Used by ``sync-bn-missing``.

    Returns:
        A :class:`Report`; ``report.ok`` is ``False`` when an error-severity finding exists.

    Every module is visited once and named by its first path, as ``model.named_modules()`` does, so a module
    registered twice (one BN shared by two branches) is one module, and a model that contains itself is checked
    without looping. A model checked for inference whose root is in training mode (``model.eval()`` was not
    called) gets one ``train-mode-inference`` error at the root listing its BNs in training mode, not one per BN;
    during an inference check a BN in training mode gets no ``small-batch`` or ``sync-bn-missing`` finding (its
    fix is ``.eval()``).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from normkit.diagnostics import doctor
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16, momentum=0.99))
        >>> report = doctor(model, torch.randn(32, 8))
        >>> sorted(report.rules()), report.ok
        (['bn-after-dropout', 'bn-before-output', 'torch-momentum-keras-value'], False)
        >>> print(report.errors[0].fix)
        use momentum=0.01 (normkit.compat.momentum_from_keras(0.99)), or 0.1 (torch's default)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: expected an nn.Module, got {type(model).__name__}. Pass the model itself.")
    if mode is None:
        mode = "train" if model.training else "inference"
    if mode not in ("train", "inference"):
        raise ValueError(f"doctor: expected mode 'train', 'inference' or None, got {mode!r}")
    if world_size is None:
        world_size = _distributed_world_size()

    work = _working_copy(model)
    if mode == "train" and not model.training:
        _set_train(work)
    trace = None
    if example_input is not None:
        trace = _trace(work, example_input)
    graph = trace if trace is not None and trace.error is None else _static_graph(work)

    names = {name: module for name, module in work.named_modules()}
    findings: list[Finding] = []
    for rule in _RULES:
        findings.extend(rule(work, names, mode, graph, trace, world_size))
    order = {name: i for i, name in enumerate(names)}
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), order.get(f.module, len(order)), f.rule))
    report = Report(findings=findings, mode=mode, dynamic=trace is not None)
    if fix:
        _apply_fixes(model, report, graph, trace, convert_small_batch)
    return report


# ---------------------------------------------------------------------------------------------------------------
# The model copy and the forward trace


def _distributed_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _cycle(model: nn.Module) -> tuple[str, nn.Module] | None:
    """A module registered inside itself: ``(path of the inner registration, that module)``, or ``None``.

    An iterative depth-first search over ``named_children`` (each module expanded once), so deep or cyclic trees
    neither recurse nor loop.
    """
    on_path_or_done: dict[int, bool] = {id(model): True}  # True: on the current path; False: finished
    stack = [(model, "", iter(model.named_children()))]
    while stack:
        module, path, children = stack[-1]
        for key, child in children:
            child_path = f"{path}.{key}" if path else key
            state = on_path_or_done.get(id(child))
            if state is True:
                return child_path, child
            if state is None:
                on_path_or_done[id(child)] = True
                stack.append((child, child_path, iter(child.named_children())))
                break
        else:
            on_path_or_done[id(module)] = False
            stack.pop()
    return None


def _set_train(work: nn.Module) -> None:
    """``work.train()``, or, when a module contains itself (``Module.train`` would recurse without end), the
    ``training`` flag set once per module."""
    if _cycle(work) is None:
        work.train()  # a model's own train() override is respected
        return
    for module in work.modules():
        module.training = True


def _working_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # any failure to copy gets the same advice
        raise TypeError(
            f"doctor: expected a model that copy.deepcopy can copy (the doctor checks a copy so that the model "
            f"stays exactly as it was), got {type(model).__name__} which raised {type(exc).__name__}: {exc}. "
            "Make its attributes copyable (e.g. drop open file handles or locks) or check a rebuilt instance."
        ) from exc


@dataclass
class _Call:
    """One call of a hooked module: what came in and where it came from."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    training: bool
    producer: str | None  # the module whose output tensor is the (first) input, by identity


@dataclass
class _Trace:
    calls: dict[str, list[_Call]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    producers: dict[int, tuple[str, weakref.ref]] = field(default_factory=dict)
    output_producer: str | None = None
    error: str | None = None
    types: dict[str, type] = field(default_factory=dict)

    def producer_of(self, name: str) -> str | None:
        calls = self.calls.get(name)
        return calls[0].producer if calls else None

    def feeds(self, name: str) -> list[str]:
        """The chain of modules feeding ``name``: the direct producer first, walked back through pass-throughs."""
        chain: list[str] = []
        current = self.producer_of(name)
        while current is not None and current not in chain:
            chain.append(current)
            if not issubclass(self.types[current], _PASS_THROUGH):
                break
            current = self.producer_of(current)
        return chain

    def output_chain(self) -> list[str]:
        chain: list[str] = []
        current = self.output_producer
        while current is not None and current not in chain:
            chain.append(current)
            if not issubclass(self.types[current], _PASS_THROUGH):
                break
            current = self.producer_of(current)
        return chain


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _trace(work: nn.Module, example_input) -> _Trace:
    trace = _Trace()
    names = {}
    for name, module in work.named_modules():
        if module not in names and (not any(True for _ in module.children()) or isinstance(module, _BatchNorm)):
            names[module] = name
            trace.types[name] = type(module)

    def pre_hook(module, args):
        name = names[module]
        inputs = list(_tensors(args))
        first = inputs[0] if inputs else None
        entry = trace.producers.get(id(first)) if first is not None else None
        producer = entry[0] if entry is not None and entry[1]() is first else None
        shape = tuple(first.shape) if first is not None else ()
        dtype = first.dtype if first is not None else torch.float32
        trace.calls.setdefault(name, []).append(_Call(shape, dtype, module.training, producer))
        trace.order.append(name)

    def post_hook(module, args, output):
        name = names[module]
        for tensor in _tensors(output):
            # a weak reference: activations are not kept alive, and a reused id() is told apart by identity
            trace.producers[id(tensor)] = (name, weakref.ref(tensor))

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    if isinstance(example_input, dict):
        args, kwargs = (), example_input
    elif isinstance(example_input, (tuple, list)):
        args, kwargs = tuple(example_input), {}
    else:
        args, kwargs = (example_input,), {}
    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            output = work(*args, **kwargs)
        outputs = list(_tensors(output))
        if outputs:
            entry = trace.producers.get(id(outputs[0]))
            trace.output_producer = entry[0] if entry is not None and entry[1]() is outputs[0] else None
    except Exception as exc:  # reported as a finding, not raised
        trace.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RecursionError):  # the calls of a runaway recursion say nothing about the model
            trace.calls.clear()
            trace.producers.clear()
            trace.order[:] = trace.order[-1:]
    finally:
        for handle in handles:
            handle.remove()
    return trace


@dataclass
class _StaticGraph:
    """"Feeds" from ``nn.Sequential`` order, when there is no forward pass to trace."""

    producer: dict[str, str] = field(default_factory=dict)
    types: dict[str, type] = field(default_factory=dict)
    output_producer: str | None = None

    def producer_of(self, name: str) -> str | None:
        return self.producer.get(name)

    feeds = _Trace.feeds
    output_chain = _Trace.output_chain


def _static_graph(work: nn.Module) -> _StaticGraph:
    """Producers from ``nn.Sequential`` order; every module named by its first path (``named_modules``)."""
    graph = _StaticGraph()
    first_path = {id(module): name for name, module in work.named_modules()}
    for name, module in work.named_modules():
        graph.types[name] = type(module)
    for module in work.modules():
        if isinstance(module, nn.Sequential):
            children = _sequence(module)  # every registration: a module shared in one Sequential comes twice
            for before, after in zip(children, children[1:], strict=False):
                # the first producer found wins, like the first call in a trace
                graph.producer.setdefault(first_path[id(_edge_leaf(after, last=False))],
                                          first_path[id(_edge_leaf(before, last=True))])
    if isinstance(work, nn.Sequential) and _sequence(work):
        graph.output_producer = first_path[id(_edge_leaf(work, last=True))]
    return graph


def _sequence(module: nn.Sequential) -> list[nn.Module]:
    """The modules a Sequential runs, in order (``iter(Sequential)`` yields every registration, duplicates too)."""
    return [child for child in module if child is not None]


def _edge_leaf(module: nn.Module, *, last: bool) -> nn.Module:
    """The first (or last) module that runs inside ``module``, descending through nested Sequentials; a Sequential
    that contains itself stops the descent where the cycle closes."""
    seen = {id(module)}
    while isinstance(module, nn.Sequential):
        children = _sequence(module)
        if not children:
            break
        child = children[-1] if last else children[0]
        if id(child) in seen:
            break
        seen.add(id(child))
        module = child
    return module


# ---------------------------------------------------------------------------------------------------------------
# The rules: each takes (work, names, mode, graph, trace, world_size) and yields findings


def _finding(rule: str, module: str, message: str, fix: str, severity: str | None = None) -> Finding:
    return Finding(rule, severity or RULES[rule][0], module, message, fix)


def _bns(names: dict[str, nn.Module]) -> Iterator[tuple[str, _BatchNorm]]:
    for name, module in names.items():
        if isinstance(module, _BatchNorm):
            yield name, module


def _rule_train_mode_inference(work, names, mode, graph, trace, world_size):
    if mode != "inference":
        return
    training = [(name, bn) for name, bn in _bns(names) if bn.training]
    if training and work.training:  # model.eval() was not called: one finding at the root, not one per BN
        count = len(training)
        they = ("these BNs normalize", "update their", "these BNs") if count > 1 else ("it normalizes", "updates its",
                                                                                      "this BN")
        yield _finding(
            "train-mode-inference", "",
            f"{count} BatchNorm layer{'s' if count > 1 else ''} in training mode: "
            f"{_name_list([name or '(root)' for name, _ in training])}. The model itself is in training mode "
            f"(model.eval() was not called) but is checked for inference: {they[0]} with the statistics of each "
            f"batch (outputs depend on the batch) and {they[1]} running statistics.",
            f"call model.eval() before inference (it also turns off Dropout); fix=True sets eval on {they[2]}",
        )
        return
    for name, bn in training:  # the model is in eval mode but these BNs were put back to training mode
        yield _finding(
            "train-mode-inference", name,
            f"{type(bn).__name__} is in training mode although the model is in eval mode and is checked for "
            "inference (a .train() on it after model.eval()?): it normalizes with the statistics of each batch "
            "(outputs depend on the batch) and updates its running statistics.",
            "call model.eval() last, after any .train() on a submodule; fix=True sets eval on this BN",
        )


def _rule_small_batch(work, names, mode, graph, trace, world_size):
    if trace is None:
        return
    for name, bn in _bns(names):
        if mode == "inference" and bn.training:
            continue  # train-mode-inference explains it, and its fix is .eval(), not GroupNorm
        calls = [c for c in trace.calls.get(name, []) if c.training and c.shape]
        if not calls:
            continue
        batch = min(c.shape[0] for c in calls)
        if batch >= MIN_BATCH:
            continue
        channels = bn.num_features
        groups = _group_count(channels)
        per_replica = f" per replica ({world_size} replicas)" if world_size > 1 else ""
        channel_rank = max(1, len(calls[0].shape) - 2)
        if len(calls[0].shape) > 2:
            norm = (f"normkit.nn.GroupNorm({groups}, {channels}) ({groups} group(s): the largest of 32/16/8/4/2/1 "
                    f"dividing {channels} with at least {_MIN_CHANNELS_PER_GROUP} channels per group; fix=True, "
                    "convert_small_batch=True converts it)")
        else:  # (N, C) features: GroupNorm over a few features of one sample is not a remedy
            norm = f"torch.nn.LayerNorm({channels}) (the input is (N, C) features)"
        yield _finding(
            "small-batch", name,
            f"a batch of {batch}{per_replica} reaches this BN in training (input {tuple(calls[0].shape)}); batch "
            f"statistics from fewer than {MIN_BATCH} samples are noisy and the running statistics drift from them.",
            f"use {norm}, normkit.nn.BatchRenorm{channel_rank}d, a larger batch, or normkit.SyncBatchNorm when the "
            "batch is split over devices",
        )


def _rule_bn_after_dropout(work, names, mode, graph, trace, world_size):
    for name, _ in _bns(names):
        chain = graph.feeds(name)
        dropouts = [m for m in chain if issubclass(graph.types[m], _DROPOUTS)]
        if dropouts:
            path = " -> ".join([*reversed(chain), name])
            yield _finding(
                "bn-after-dropout", name,
                f"Dropout feeds this BN ({path}): in training the BN's statistics see the dropped, rescaled "
                "activations, at inference the undropped ones, so the running variance does not match inference.",
                f"move the Dropout ({dropouts[0]}) after the BN (conv -> BN -> activation -> dropout)",
            )


def _rule_bn_before_output(work, names, mode, graph, trace, world_size):
    chain = graph.output_chain()
    bns = [m for m in chain if issubclass(graph.types[m], _BatchNorm)]
    if bns:
        path = " -> ".join(reversed(chain))
        where = "is the output layer" if chain[0] == bns[0] else f"comes right before the output ({path})"
        yield _finding(
            "bn-before-output", bns[0],
            f"this BN {where}: it pins the outputs' per-channel mean and scale to β and γ, fighting the loss "
            "(logits, regression targets).",
            "end the model with a plain Linear/Conv (no BN after the last layer); keep BN in hidden layers",
        )


def _rule_bias_before_bn(work, names, mode, graph, trace, world_size):
    for name, bn in _bns(names):
        producer = graph.producer_of(name)
        if producer is None or producer not in names:
            continue
        layer = names[producer]
        if not isinstance(layer, _BIASED) or getattr(layer, "bias", None) is None:
            continue
        if not _bias_is_per_channel(layer, bn, name, trace):
            continue
        yield _finding(
            "bias-before-bn", producer,
            f"{type(layer).__name__} has a bias and feeds {name} directly: the BN subtracts the channel mean, so "
            f"the {layer.bias.numel()} bias values cancel (redundant parameters, wasted optimizer state).",
            f"build it with bias=False; fix=True drops the bias and moves its value into {name}.running_mean "
            "(outputs unchanged; rebuild the optimizer afterwards)",
        )


def _bias_is_per_channel(layer: nn.Module, bn: _BatchNorm, bn_name: str, trace: _Trace | None) -> bool:
    if layer.bias.numel() != bn.num_features:
        return False
    if isinstance(layer, nn.Linear):
        calls = trace.calls.get(bn_name) if trace is not None else None
        if calls:  # a Linear's bias is per channel only for (N, C) inputs of the BN
            return len(calls[0].shape) == 2
        return isinstance(bn, nn.BatchNorm1d)
    return True


def _rule_frozen_stats_updating(work, names, mode, graph, trace, world_size):
    if mode != "train":
        return
    for name, bn in _bns(names):
        params = [p for p in (bn.weight, bn.bias) if p is not None]
        if params and not any(p.requires_grad for p in params) and bn.training and bn.track_running_stats:
            yield _finding(
                "frozen-stats-updating", name,
                "γ and β are frozen (requires_grad=False) but the BN is in training mode, so every forward still "
                "normalizes with batch statistics and overwrites the pretrained running statistics.",
                "freeze them for good with normkit.tools.freeze(model) (FrozenBatchNorm: model.train() cannot "
                "un-freeze it); or unfreeze γ and β if the BN should adapt",
            )


def _rule_momentum(work, names, mode, graph, trace, world_size):
    for name, bn in _bns(names):
        m = bn.momentum
        if m is not None and m >= 0.5:
            yield _finding(
                "torch-momentum-keras-value", name,
                f"momentum={m:g} in torch's convention keeps {m:.0%} of each new batch and only {1 - m:.0%} of the "
                "running statistics: that is a Keras/Flax momentum (moving = m*moving + (1-m)*batch).",
                f"use momentum={1 - m:.3g} (normkit.compat.momentum_from_keras({m:g})), or 0.1 (torch's default)",
            )


def _rule_eps(work, names, mode, graph, trace, world_size):
    for name, bn in _bns(names):
        calls = trace.calls.get(name) if trace is not None else None
        dtype = calls[0].dtype if calls else _module_dtype(bn)
        if not dtype.is_floating_point:
            continue
        info = torch.finfo(dtype)
        eps = float(bn.eps)
        as_dtype = float(torch.tensor(eps, dtype=dtype)) if math.isfinite(eps) else eps
        if not eps > 0 or as_dtype == 0:
            yield _finding(
                "eps-too-small", name,
                f"eps={eps:g} is {'not positive' if not eps > 0 else f'0 in {dtype}'}: a channel with zero "
                "variance divides by zero (inf/NaN outputs).",
                f"use eps=1e-5 (torch's default){' or 1e-3 in float16' if info.bits == 16 else ''}",
                severity="error",
            )
        elif eps < info.tiny:
            yield _finding(
                "eps-too-small", name,
                f"eps={eps:g} is below the smallest normal {dtype} ({info.tiny:.3g}): where var + eps is formed in "
                f"{dtype} it is subnormal (precision lost) or flushed to zero on a near-constant channel.",
                f"use eps >= {_suggest_eps(info):g} for {dtype}, or keep BN in float32 (autocast does)",
            )


def _suggest_eps(info: torch.finfo) -> float:
    return 1e-3 if info.tiny > 1e-5 else 1e-5


def _module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _rule_dead_channels(work, names, mode, graph, trace, world_size):
    for name, bn in _bns(names):
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None:
            continue
        bad = ~(torch.isfinite(mean) & torch.isfinite(var))
        if bad.any():
            channels = _channel_list(bad)
            yield _finding(
                "dead-channels", name,
                f"{int(bad.sum())} of {bad.numel()} channels have non-finite running statistics ({channels}): "
                "every inference output of those channels is NaN.",
                "find the batch that produced inf/NaN (normkit BatchNorm's nonfinite='skip' keeps such batches out), "
                "then recompute the statistics (normkit.tools.recalibrate) or reload a good checkpoint",
                severity="error",
            )
            continue
        dead = var <= bn.eps
        if dead.any():
            yield _finding(
                "dead-channels", name,
                f"{int(dead.sum())} of {dead.numel()} channels have running variance <= eps={bn.eps:g} "
                f"({_channel_list(dead)}): the channel is constant in the data (often a dead ReLU upstream), so "
                "eps dominates the normalization and its output is β.",
                "check the layer feeding it (dead units, a constant input); prune the channels or recalibrate the "
                "statistics on representative data",
            )


def _channel_list(mask: torch.Tensor) -> str:
    index = mask.nonzero().flatten().tolist()
    text = ", ".join(map(str, index[:8]))
    return f"channels {text}{', ...' if len(index) > 8 else ''}"


def _rule_bn_in_recurrence(work, names, mode, graph, trace, world_size):
    if trace is None:
        return
    for name, _ in _bns(names):
        count = len(trace.calls.get(name, []))
        if count > 1:
            yield _finding(
                "bn-in-recurrence", name,
                f"this BN runs {count} times in one forward (one module reused across time steps or branches): its "
                "running statistics blend every step's distribution, which need not match any single step.",
                "use one BN per time step (sequence-wise BN, Cooijmans et al. 2016) or LayerNorm in recurrent "
                "loops; separate BNs per branch",
            )


def _rule_sync_bn_missing(work, names, mode, graph, trace, world_size):
    if trace is None or world_size <= 1:
        return
    for name, bn in _bns(names):
        if isinstance(bn, nn.SyncBatchNorm) or (mode == "inference" and bn.training):
            continue  # a BN in training mode during an inference check: train-mode-inference explains it
        calls = [c for c in trace.calls.get(name, []) if c.training and c.shape]
        if calls and calls[0].shape[0] < SYNC_MIN_BATCH:
            batch = calls[0].shape[0]
            yield _finding(
                "sync-bn-missing", name,
                f"{world_size} data-parallel replicas but a plain {type(bn).__name__}: its statistics come from the "
                f"per-replica batch of {batch}, not the global {batch * world_size}.",
                "convert with torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) (or normkit's SyncBatchNorm) "
                "before wrapping in DDP",
            )


def _rule_bn_effect_removed(work, names, mode, graph, trace, world_size):
    for name, module in names.items():
        if not isinstance(module, (_BatchNorm, _InstanceNorm)):
            continue
        producer, seen = graph.producer_of(name), {name}
        while (producer is not None and producer not in seen  # a shared Identity can make the producers circular
               and issubclass(graph.types.get(producer, object), nn.Identity)):
            seen.add(producer)
            producer = graph.producer_of(producer)
        if producer is not None and issubclass(graph.types.get(producer, object), _BatchNorm):
            yield _finding(
                "bn-effect-removed", producer,
                f"this BN feeds {name} ({type(module).__name__}) directly, which normalizes the same channels again "
                "and undoes this BN's γ and β.",
                "drop one of the two normalizations (or put a non-linearity between them)",
            )


def _rule_forward_failed(work, names, mode, graph, trace, world_size):
    if trace is not None and trace.error is not None:
        where = trace.order[-1] if trace.order else ""
        recursion = trace.error.startswith("RecursionError")
        seen = ("dynamic rules were skipped (a runaway recursion's calls say nothing)" if recursion
                else "dynamic rules saw only the modules before it")
        fix = ("fix what the error names: often the example input (shape, dtype, device; a BN in training needs "
               "more than one value per channel), otherwise the model (see the other findings)")
        cycle = _cycle(work) if recursion else None
        if cycle is not None:
            inner, module = cycle
            first = next(name for name, m in names.items() if m is module)
            fix = (f"the model contains itself: {inner!r} is the module {first or '(root)'!r}, so its forward calls "
                   "itself without end; remove that registration, or keep the reference outside the module tree "
                   "(a plain list or a weakref is not registered as a submodule)")
        yield _finding(
            "forward-failed", where,
            f"the forward pass on the example input raised {trace.error} (last module entered: {where or 'none'}); "
            f"{seen}, 'feeds' comes from nn.Sequential order.",
            fix,
        )


_RULES = (
    _rule_forward_failed, _rule_train_mode_inference, _rule_small_batch, _rule_bn_after_dropout,
    _rule_bn_before_output, _rule_bias_before_bn, _rule_frozen_stats_updating, _rule_momentum, _rule_eps,
    _rule_dead_channels, _rule_bn_in_recurrence, _rule_sync_bn_missing, _rule_bn_effect_removed,
)


def _group_count(channels: int) -> int:
    """The GroupNorm group count suggested for ``channels``: the largest of 32/16/8/4/2/1 dividing ``channels``
    with at least 4 channels per group (1 for fewer than 8 channels).

    Examples::

        >>> [_group_count(c) for c in (3, 8, 12, 64, 256)]
        [1, 2, 2, 16, 32]
    """
    return next((g for g in _GROUP_COUNTS if channels % g == 0 and channels // g >= _MIN_CHANNELS_PER_GROUP), 1)


# ---------------------------------------------------------------------------------------------------------------
# The safe fixes (on the caller's model, by qualified name)


def _apply_fixes(model: nn.Module, report: Report, graph, trace: _Trace | None, convert_small_batch: bool) -> None:
    fixed = []
    for finding in report.findings:
        done = None
        if finding.rule == "bias-before-bn":
            done = _drop_bias(model, finding.module, graph)
        elif finding.rule == "train-mode-inference":
            done = _set_eval(model, finding.module)
        elif finding.rule == "small-batch" and convert_small_batch:
            done = _to_group_norm(model, finding.module, trace)
        if done is not None:
            report.changes.append(done)
        fixed.append(replace(finding, fixed=done is not None))
    report.findings[:] = fixed


def _set_eval(model: nn.Module, name: str) -> str:
    """``.eval()`` the flagged BN, or, for the root finding, every BN in training mode (the BNs only)."""
    module = model.get_submodule(name)
    if isinstance(module, _BatchNorm):
        module.eval()
        return f"{name or '(root)'}: set to eval mode"
    bns = [(bn_name, bn) for bn_name, bn in model.named_modules() if isinstance(bn, _BatchNorm) and bn.training]
    for _, bn in bns:
        bn.eval()
    count = len(bns)
    return (f"{', '.join(bn_name for bn_name, _ in bns)}: set to eval mode ({count} BatchNorm "
            f"layer{'s' if count != 1 else ''}; the other modules, Dropout included, keep their flag: call "
            "model.eval())")


def _drop_bias(model: nn.Module, layer_name: str, graph) -> str | None:
    layer = model.get_submodule(layer_name)
    bn_name = next((name for name, module in model.named_modules()
                    if isinstance(module, _BatchNorm) and graph.producer_of(name) == layer_name), None)
    if bn_name is None or layer.bias is None:
        return None
    bn = model.get_submodule(bn_name)
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.sub_(layer.bias.detach().to(bn.running_mean.dtype))
    layer.bias = None
    return f"{layer_name}: bias removed (its value moved into {bn_name}.running_mean)"


def _to_group_norm(model: nn.Module, bn_name: str, trace: _Trace | None) -> str | None:
    calls = trace.calls.get(bn_name) if trace is not None else None
    if not bn_name or not calls or len(calls[0].shape) < 3:
        return None  # the root, or (N, C) features: GroupNorm over a few channels of one sample is not a fix
    bn = model.get_submodule(bn_name)
    groups = _group_count(bn.num_features)
    gn = GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            if bn.bias is not None:
                gn.bias.copy_(bn.bias)
    reference = next(iter((*bn.parameters(), *bn.buffers())), None)
    if reference is not None:
        gn = gn.to(device=reference.device, dtype=_module_dtype(bn))
    gn.train(bn.training)
    # every registration of the BN (a shared BN stays shared); _modules, not named_children, which skips
    # a module registered twice in one parent
    slots = [(parent, key) for parent in model.modules() for key, child in parent._modules.items() if child is bn]
    for parent, key in slots:
        setattr(parent, key, gn)
    where = f" (at {len(slots)} places, shared)" if len(slots) > 1 else ""
    return f"{bn_name}: replaced by GroupNorm({groups}, {bn.num_features}) with γ/β copied{where}"
