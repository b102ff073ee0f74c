"""The peer harness: PyTorch's own ``module_db`` inputs, run against normkit's drop-ins and (as a control) torch's.

Each test is parametrized over ``impl`` in ``("ours", "torch")``: ``ours`` builds ``normkit.nn.<Name>``, ``torch``
builds ``torch.nn.<Name>``; both are compared with ``torch.nn.<Name>`` built from the same constructor arguments and
loaded with the same (randomised) state. The torch run must pass too: it proves that a check can pass and that a
failure of ``ours`` is normkit's, not the harness's. Every check counts what it compared (:class:`Tally`) and fails
when it compared nothing, so no test passes vacuously.

The ModuleInfo's input functions are called with torch's own ModuleInfo (they choose shapes by
``module_info.module_cls``, e.g. the BatchNorm error inputs); only the class that is built is substituted.

Known normkit bugs are listed in :data:`KNOWN_BUGS`; the matching ``ours`` cases are marked
``xfail(strict=True)`` so that they flip to failures once the source is fixed.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch.testing._internal.common_modules import (
    ErrorModuleInput,
    FunctionInput,
    ModuleErrorEnum,
    ModuleInfo,
    ModuleInput,
    module_db,
)
from torch.utils._pytree import tree_flatten, tree_map

import normkit.nn

NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm",
         "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
IMPLS = ("ours", "torch")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}
MODES = {"train": True, "eval": False}
TOLERANCES = {  # (atol, rtol) against torch's class in the same dtype
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-2, 1.6e-2),
}
GRAD_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-9, 1e-9), torch.bfloat16: (5e-2, 5e-2)}
SEED = 0


# ---------------------------------------------------------------------------------------------------- module_db


def module_info(name: str) -> ModuleInfo:
    """torch's ModuleInfo named ``nn.<name>`` (exactly one must exist)."""
    matches = [info for info in module_db if info.name == f"nn.{name}"]
    assert len(matches) == 1, f"module_db has {len(matches)} ModuleInfos named nn.{name}"
    return matches[0]


def module_class(impl: str, name: str) -> type[torch.nn.Module]:
    """``normkit.nn.<name>`` for ``ours``, ``torch.nn.<name>`` for ``torch``."""
    if impl == "ours":
        cls = getattr(normkit.nn, name)
        assert cls is not getattr(torch.nn, name) and issubclass(cls, getattr(torch.nn, name))
        return cls
    assert impl == "torch", impl
    return getattr(torch.nn, name)


def module_inputs(name: str, dtype: torch.dtype, training: bool, requires_grad: bool = True) -> list[ModuleInput]:
    """The ModuleInfo's inputs, drawn from a fixed seed (so every call gives the same tensors)."""
    info = module_info(name)
    with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
        torch.manual_seed(SEED)
        inputs = list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                              training=training))
    assert inputs, f"module_db gave no inputs for nn.{name}"
    return inputs


def error_inputs(name: str, training: bool = True) -> list[ErrorModuleInput]:
    info = module_info(name)
    if info.module_error_inputs_func is None:
        return []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                                  training=training))


def desc_id(desc: str) -> str:
    return desc or "default"


def module_input(name: str, desc: str, dtype: torch.dtype, training: bool, requires_grad: bool = True) -> ModuleInput:
    """The input called ``desc`` of ``nn.<name>``."""
    matches = [mi for mi in module_inputs(name, dtype, training, requires_grad) if desc_id(mi.desc) == desc]
    assert len(matches) == 1, f"nn.{name} has {len(matches)} inputs called {desc!r}"
    return matches[0]


def tensors_of(fi: FunctionInput) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((fi.args, fi.kwargs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def first_tensor(mi: ModuleInput) -> torch.Tensor:
    tensors = tensors_of(mi.forward_input)
    assert tensors, "a forward input without tensors"
    return tensors[0]


# ---------------------------------------------------------------------------------------------------- parametrize

# (check, {Case field: value}, reason): the ``ours`` cases of ``check`` whose fields all match are strict xfails
# (e.g. ``("memory_format", {"name": "GroupNorm", "mode": "train"}, "...")``). Empty: no known normkit bug.
KNOWN_BUGS: list[tuple[str, dict[str, str], str]] = []


def known_bug(check: str, case: Case) -> str | None:
    for bug_check, fields, reason in KNOWN_BUGS:
        if bug_check == check and all(getattr(case, field) == value for field, value in fields.items()):
            return reason
    return None


@dataclass(frozen=True)
class Case:
    impl: str
    name: str
    desc: str | None = None
    dtype: str | None = None
    mode: str | None = None
    extra: str | None = None
    override: type[torch.nn.Module] | None = None  # the harness's self-tests put a broken class here

    @property
    def cls(self) -> type[torch.nn.Module]:
        return self.override if self.override is not None else module_class(self.impl, self.name)

    @property
    def torch_cls(self) -> type[torch.nn.Module]:
        return getattr(torch.nn, self.name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or "f32"]

    @property
    def training(self) -> bool:
        return MODES[self.mode or "train"]

    @property
    def info(self) -> ModuleInfo:
        return module_info(self.name)

    def input(self, requires_grad: bool = True, dtype: torch.dtype | None = None) -> ModuleInput:
        assert self.desc is not None
        return module_input(self.name, self.desc, dtype or self.torch_dtype, self.training, requires_grad)


REGISTERED: dict[str, list[Case]] = {}  # check -> its cases, as the test modules parametrize them


def params(check: str, cases: Iterable[Case]) -> list:
    """``pytest.param``s with readable ids; ``ours`` cases listed in :data:`KNOWN_BUGS` become strict xfails."""
    cases = list(cases)
    assert check not in REGISTERED, f"two parametrizations called {check!r}"
    REGISTERED[check] = cases
    out = []
    for case in cases:
        parts = [case.impl, case.name, case.desc, case.extra, case.dtype, case.mode]
        marks = []
        if case.impl == "ours":
            reason = known_bug(check, case)
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=f"normkit bug: {reason}"))
        out.append(pytest.param(case, id="-".join(p for p in parts if p is not None), marks=marks))
    assert out, f"no cases for {check}"
    return out


def input_cases(dtypes: Iterable[str | None] = ("f32", "f64"), modes: Iterable[str | None] = ("train", "eval"),
                where: Callable[[str, ModuleInput], bool] | None = None, names: Iterable[str] = NAMES,
                extras: Iterable[str | None] = (None,)) -> Iterator[Case]:
    """One case per (impl, module, module_db input, extra, dtype, mode); ``where`` filters inputs."""
    dtypes, modes, extras = tuple(dtypes), tuple(modes), tuple(extras)
    for name in names:
        descs = [desc_id(mi.desc) for mi in module_inputs(name, torch.float32, True)]
        assert len(set(descs)) == len(descs), f"nn.{name}: input descriptions are not unique: {descs}"
        for mi, desc in zip(module_inputs(name, torch.float32, True), descs, strict=True):
            if where is not None and not where(name, mi):
                continue
            for impl in IMPLS:
                for extra in extras:
                    for dtype in dtypes:
                        for mode in modes:
                            yield Case(impl, name, desc, dtype, mode, extra)


# ---------------------------------------------------------------------------------------------------- comparing


class Tally:
    """Counts what a test compared; :meth:`done` fails a test that compared nothing."""

    def __init__(self) -> None:
        self.count = 0

    def done(self, at_least: int = 1) -> None:
        assert self.count >= at_least, f"compared {self.count} things, expected at least {at_least}"


def significant_strides(t: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """``(dim, stride)`` over the dims of size > 1 (the strides of size-0/1 dims do not matter)."""
    return tuple((d, s) for d, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)) if n > 1)


def assert_same_tensor(actual, expected, what: str, tally: Tally, *, atol: float, rtol: float,
                       strides: bool = False) -> None:
    """Same None-ness, dtype, shape, values (NaN == NaN) and, with ``strides``, strides over dims of size > 1."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {type(actual).__name__} vs {type(expected).__name__}"
        tally.count += 1
        return
    assert isinstance(actual, torch.Tensor), f"{what}: not a tensor: {type(actual)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if actual.device.type != "meta":
        torch.testing.assert_close(actual.detach(), expected.detach(), atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
    if strides:
        assert significant_strides(actual) == significant_strides(expected), (
            f"{what}: strides {actual.stride()} != {expected.stride()} (shape {tuple(actual.shape)})")
    tally.count += 1


def assert_same_results(actual: dict, expected: dict, what: str, tally: Tally, dtype: torch.dtype, *,
                        strides: Iterable[str] = (), scale: float = 1.0) -> None:
    """Two result dicts (see :func:`run`): same keys, each entry compared (gradients with
    :data:`GRAD_TOLERANCES`, the rest with :data:`TOLERANCES`, both times ``scale``); strides for ``strides``."""
    assert actual.keys() == expected.keys(), f"{what}: {sorted(actual)} != {sorted(expected)}"
    strides = set(strides)
    for key in expected:
        atol, rtol = (GRAD_TOLERANCES if key.startswith("grad:") else TOLERANCES)[dtype]
        assert_same_tensor(actual[key], expected[key], f"{what}: {key}", tally, atol=atol * scale,
                           rtol=rtol * scale, strides=key in strides)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter and buffer (``num_batches_tracked`` included), detached clones."""
    state = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    state.update({f"buffer:{n}": None if b is None else b.detach().clone() for n, b in module.named_buffers()})
    return state


def assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module, what: str, tally: Tally,
                      dtype: torch.dtype) -> None:
    assert_same_results(state_of(actual), state_of(expected), f"{what} state", tally, dtype)


# ---------------------------------------------------------------------------------------------------- building


def randomize_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial state: weights around 1, biases and running means around 0, running vars in (0.5, 2),
    ``num_batches_tracked = 3`` (so the cumulative average of ``momentum=None`` is exercised)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(t.dtype)

    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t is None or t.device.type == "meta":
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "num_batches_tracked":
                t.fill_(3)
            elif leaf in ("weight", "running_var"):
                t.copy_(draw(t, 0.5, 2.0))
            else:
                t.copy_(draw(t, -0.5, 0.5))
    return module


def build(cls: type[torch.nn.Module], mi: ModuleInput, dtype: torch.dtype, training: bool,
          state: dict | None = None) -> torch.nn.Module:
    """``cls`` from the input's constructor arguments, in ``dtype`` (as test_modules does: ``.to(dtype)``), loaded
    with ``state`` (a torch module's state_dict) or randomised."""
    c = mi.constructor_input
    module = cls(*c.args, **c.kwargs).to(dtype)
    assert type(module) is cls
    if state is None:
        randomize_(module)
    else:
        module.load_state_dict(state)
    return module.train(training)


def build_pair(case: Case, mi: ModuleInput, dtype: torch.dtype | None = None,
               training: bool | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(candidate, torch reference)`` with the same randomised state."""
    dtype = case.torch_dtype if dtype is None else dtype
    training = case.training if training is None else training
    ref = build(case.torch_cls, mi, dtype, training)
    cand = build(case.cls, mi, dtype, training, state=ref.state_dict())
    return cand, ref


Transform = Callable[[torch.Tensor], torch.Tensor]


def clone_input(fi: FunctionInput, transform: Transform | None = None, leaf_transform: Transform | None = None,
                ) -> tuple[tuple, dict, list[torch.Tensor]]:
    """``(args, kwargs, leaves)``: fresh leaf copies of every tensor (``requires_grad`` kept; ``leaf_transform``
    applied to the copy before it becomes a leaf), passed through ``transform`` (a differentiable view or op)."""
    leaves: list[torch.Tensor] = []

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        leaf = x.detach().clone()
        if leaf_transform is not None:
            leaf = leaf_transform(leaf)
        leaf = leaf.detach().requires_grad_(x.requires_grad)
        leaves.append(leaf)
        return leaf if transform is None else transform(leaf)

    args, kwargs = tree_map(one, (fi.args, fi.kwargs))
    return args, kwargs, leaves


def upstream_like(out: torch.Tensor, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype=out.dtype, device=out.device)


def run(module: torch.nn.Module, fi: FunctionInput, *, backward: bool = True, transform: Transform | None = None,
        leaf_transform: Transform | None = None, grad_transform: Transform | None = None,
        extra: dict | None = None) -> dict[str, torch.Tensor | None]:
    """Forward (and backward of a fixed upstream gradient) on fresh copies of the input; returns the output, the
    gradients of every input leaf and parameter, and every parameter and buffer afterwards. ``extra["args"]``
    receives the arguments the module was called with."""
    args, kwargs, leaves = clone_input(fi, transform, leaf_transform)
    out = module(*args, **kwargs)
    result: dict[str, torch.Tensor | None] = {"output": out.detach()}
    if extra is not None:
        extra["args"] = args
    if backward:
        wrt = [t for t in leaves if t.requires_grad] + [p for p in module.parameters() if p.requires_grad]
        names = [f"grad:input{i}" for i, t in enumerate(leaves) if t.requires_grad]
        names += [f"grad:{n}" for n, p in module.named_parameters() if p.requires_grad]
        assert wrt and out.requires_grad, "nothing to differentiate"
        grad = upstream_like(out)
        if grad_transform is not None:
            grad = grad_transform(grad)
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
        result.update(zip(names, grads, strict=True))
    result.update(state_of(module))
    return result


# ---------------------------------------------------------------------------------------------------- layouts


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values, non-contiguous: interleaved with a copy along the last dim of size > 1, then every other
    element taken (a stride-2 view). Leaves tensors that cannot be made non-contiguous (numel <= 1) alone."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    if not dims or t.numel() == 0:
        return t
    d = dims[-1]
    out = t.repeat_interleave(2, dim=d)[(slice(None),) * d + (slice(None, None, 2),)]
    assert not out.is_contiguous() and torch.equal(out.detach(), t.detach())
    return out


def noncontiguous_state_(module: torch.nn.Module) -> int:
    """Every parameter and buffer that can be, made non-contiguous in place (``set_`` to a stride-2 view with the
    same values, so the module keeps the same Parameter/buffer objects); returns how many were."""
    count = 0
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if can_be_noncontiguous(t):
                t.set_(noncontiguous(t.detach()))
                assert not t.is_contiguous()
                count += 1
    return count


def can_be_noncontiguous(t: torch.Tensor) -> bool:
    return t.numel() > 1 and any(n > 1 for n in t.shape)


def channels_last_format(ndim: int) -> torch.memory_format:
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def outcome(fn: Callable[[], object]) -> tuple[BaseException | None, object]:
    """``(exception, None)`` if ``fn()`` raised, else ``(None, its result)``."""
    try:
        return None, fn()
    except Exception as exc:
        return exc, None


def only_tensor_argument(mi: ModuleInput) -> torch.Tensor:
    fi = mi.forward_input
    assert len(fi.args) == 1 and not fi.kwargs and isinstance(fi.args[0], torch.Tensor), "one tensor argument"
    return fi.args[0]


# ---------------------------------------------------------------------------------------------------- the checks


def check_forward(case: Case) -> Tally:
    """1. forward: output (values, dtype, shape, strides), gradients (not in bfloat16), state after the call and
    the warnings emitted equal torch's class's on the same constructor arguments, state and input; the
    ModuleInput's reference_fn (if any) agrees too."""
    tally = Tally()
    dtype = case.torch_dtype
    mi = case.input()
    cand, ref = build_pair(case, mi)
    before = copy.deepcopy(cand)
    backward = dtype != torch.bfloat16
    with warnings.catch_warnings(record=True) as our_warnings:
        warnings.simplefilter("always")
        ours = run(cand, mi.forward_input, backward=backward)
    with warnings.catch_warnings(record=True) as torch_warnings:
        warnings.simplefilter("always")
        theirs = run(ref, mi.forward_input, backward=backward)
    assert_same_results(ours, theirs, "vs torch", tally, dtype, strides=("output",))
    # the same warnings as torch's (any a test elsewhere does not expect fails it: filterwarnings = error)
    assert [w.category for w in our_warnings] == [w.category for w in torch_warnings], (
        f"warnings {[str(w.message) for w in our_warnings]} != torch's {[str(w.message) for w in torch_warnings]}")
    for ours_w, torch_w in zip(our_warnings, torch_warnings, strict=True):
        assert str(ours_w.message).startswith(str(torch_w.message).split("\n")[0]), (ours_w.message, torch_w.message)
    tally.count += 1
    if mi.reference_fn is not None and dtype != torch.bfloat16:
        args, kwargs, _ = clone_input(mi.forward_input)
        expected = mi.reference_fn(before, *args, **kwargs)
        assert_same_tensor(ours["output"], expected.detach(), "vs reference_fn", tally, atol=TOLERANCES[dtype][0],
                           rtol=TOLERANCES[dtype][1])
    return tally


def check_noncontiguous(case: Case, state: bool = False) -> Tally:
    """2. non-contiguous inputs and upstream gradient (and, with ``state``, parameters and buffers): output,
    input/parameter gradients and buffers equal the contiguous run's, and torch's class's on the same
    non-contiguous input (output strides included)."""
    tally = Tally()
    dtype = case.torch_dtype
    mi = case.input()
    fi = mi.forward_input
    cand, ref = build_pair(case, mi)
    contiguous_run = build(case.cls, mi, dtype, case.training, state=ref.state_dict())
    expected = run(contiguous_run, fi)
    if state:  # parameters and buffers too (the modules that have any)
        assert noncontiguous_state_(cand) == noncontiguous_state_(ref) > 0
    extra: dict = {}
    ours = run(cand, fi, transform=noncontiguous, grad_transform=noncontiguous, extra=extra)
    called_with = [t for t in tree_flatten(extra["args"])[0] if isinstance(t, torch.Tensor)]
    assert called_with and not any(t.is_contiguous() for t in called_with), "the inputs are not non-contiguous"
    theirs = run(ref, fi, transform=noncontiguous, grad_transform=noncontiguous)
    assert_same_results(ours, expected, "non-contiguous vs contiguous", tally, dtype)
    assert_same_results(ours, theirs, "non-contiguous vs torch", tally, dtype, strides=("output",))
    return tally


def check_memory_format(case: Case) -> Tally:
    """3. memory formats: every combination of a (channels_last | contiguous) input and a module moved with
    ``.to(memory_format=...)``: output, gradients and state equal the contiguous run's; output and input-gradient
    strides equal torch's class's on the same input."""
    tally = Tally()
    dtype = case.torch_dtype
    mi = case.input()
    fi = mi.forward_input
    ndim = first_tensor(mi).dim()
    fmt = channels_last_format(ndim)
    _, ref = build_pair(case, mi)
    state = ref.state_dict()
    expected = run(build(case.cls, mi, dtype, case.training, state=state), fi)
    # GroupNorm's channels_last kernel sums in another order (test_modules widens float32 to 1e-4 for it too)
    scale = 10.0 if case.name == "GroupNorm" and dtype == torch.float32 else 1.0
    for x_fmt in (torch.contiguous_format, fmt):
        for m_fmt in (torch.contiguous_format, fmt):
            what = f"input {x_fmt}, module {m_fmt}"

            def to_format(t: torch.Tensor, x_fmt=x_fmt) -> torch.Tensor:
                return t.contiguous(memory_format=x_fmt) if t.dim() == ndim else t

            cand = build(case.cls, mi, dtype, case.training, state=state)
            assert cand.to(memory_format=m_fmt) is cand and type(cand) is case.cls
            torch_module = build(case.torch_cls, mi, dtype, case.training, state=state).to(memory_format=m_fmt)
            ours = run(cand, fi, leaf_transform=to_format, grad_transform=to_format)
            theirs = run(torch_module, fi, leaf_transform=to_format, grad_transform=to_format)
            assert_same_results(ours, expected, f"{what} vs contiguous", tally, dtype, scale=scale)
            assert_same_results(ours, theirs, f"{what} vs torch", tally, dtype, strides=("output", "grad:input0"))
    return tally


def outputs_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-6, rtol=1e-6, equal_nan=True)


def check_train_eval(case: Case) -> tuple[Tally, bool]:
    """4. train/eval: train(x), eval(x), train(x'), eval(x'), eval(x) against torch's class call by call (output,
    gradients, running statistics, num_batches_tracked); train and eval outputs differ exactly where torch's do.
    Returns whether the train and eval outputs differed."""
    tally = Tally()
    dtype = case.torch_dtype
    mi = case.input()
    fi = mi.forward_input
    cand, ref = build_pair(case, mi, training=True)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        return t * 1.5 + 0.25

    outputs: dict[str, list[torch.Tensor]] = {"ours": [], "torch": []}
    for step, (training, transform) in enumerate(
            [(True, None), (False, None), (True, shifted), (False, shifted), (False, None)]):
        cand.train(training)
        ref.train(training)
        ours = run(cand, fi, transform=transform)
        theirs = run(ref, fi, transform=transform)
        assert_same_results(ours, theirs, f"call {step} ({'train' if training else 'eval'})", tally, dtype,
                            strides=("output",))
        outputs["ours"].append(ours["output"])
        outputs["torch"].append(theirs["output"])
    for first, second in ((0, 1), (2, 3)):
        ours_differ = outputs_differ(outputs["ours"][first], outputs["ours"][second])
        torch_differs = outputs_differ(outputs["torch"][first], outputs["torch"][second])
        assert ours_differ == torch_differs, (
            f"train and eval outputs {'differ' if ours_differ else 'agree'}, torch's "
            f"{'differ' if torch_differs else 'agree'}")
        if not case.info.train_and_eval_differ:
            assert not torch_differs, "train_and_eval_differ=False, yet torch's train and eval outputs differ"
        tally.count += 1
    return tally, outputs_differ(outputs["torch"][0], outputs["torch"][1])


def check_serialization(case: Case) -> Tally:
    """5. pickle round trip, torch.save/torch.load(weights_only=True) of the state_dict, torch.save/torch.load(
    weights_only=False) of the module: same class, state and output (and state after the call) as the original;
    the state_dict's keys, shapes and dtypes are torch's."""
    tally = Tally()
    dtype = case.torch_dtype
    mi = case.input()
    fi = mi.forward_input
    original, ref = build_pair(case, mi)
    sd, torch_sd = original.state_dict(), ref.state_dict()
    assert list(sd) == list(torch_sd), f"state_dict keys {list(sd)} != torch's {list(torch_sd)}"
    for key, value in torch_sd.items():
        assert_same_tensor(sd[key], value, f"state_dict[{key!r}]", tally, atol=0, rtol=0)

    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    loaded_sd = torch.load(buffer, weights_only=True)
    from_state_dict = case.cls(*mi.constructor_input.args, **mi.constructor_input.kwargs).to(dtype)
    from_state_dict.load_state_dict(loaded_sd)
    from_state_dict.train(case.training)

    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    copies = {
        "pickle": pickle.loads(pickle.dumps(original)),
        "torch.save(state_dict)": from_state_dict,
        "torch.save(module)": torch.load(buffer, weights_only=False),
    }
    expected = run(copy.deepcopy(original), fi)
    for how, restored in copies.items():
        assert type(restored) is case.cls, f"{how}: {type(restored)} is not {case.cls}"
        assert restored.training == case.training, f"{how}: training flag lost"
        assert_same_results(state_of(restored), state_of(original), f"{how}: state", tally, dtype)
        assert repr(restored) == repr(original), f"{how}: {restored!r} != {original!r}"
        assert_same_results(run(restored, fi), expected, f"{how}: run", tally, dtype, strides=("output",))
    return tally


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if t is not None}


def _assert_like(actual: torch.nn.Module, expected: torch.nn.Module, what: str, tally: Tally) -> None:
    """Same parameter/buffer names, shapes, dtypes and devices (not values)."""
    ours, theirs = _tensors(actual), _tensors(expected)
    assert list(ours) == list(theirs), f"{what}: {list(ours)} != {list(theirs)}"
    tally.count += 1
    for name, t in theirs.items():
        got = (ours[name].shape, ours[name].dtype, ours[name].device)
        assert got == (t.shape, t.dtype, t.device), f"{what}: {name} is {got}, torch's {(t.shape, t.dtype, t.device)}"
        tally.count += 1


def check_factory_kwargs(case: Case) -> Tally:
    """6. ``device="cpu", dtype=torch.float64`` puts every floating parameter/buffer in float64 on the CPU (like
    torch's; integer buffers stay integer), and ``device="meta"`` builds on the meta device."""
    tally = Tally()
    c = case.input().constructor_input
    for factory_kwargs in ({"device": "cpu", "dtype": torch.float64}, {"device": "meta"},
                           {"device": "meta", "dtype": torch.float64}):
        ours = case.cls(*c.args, **c.kwargs, **factory_kwargs)
        theirs = case.torch_cls(*c.args, **c.kwargs, **factory_kwargs)
        assert type(ours) is case.cls
        _assert_like(ours, theirs, f"{factory_kwargs}", tally)
        for name, t in _tensors(ours).items():
            assert t.device == torch.device(factory_kwargs["device"]), f"{name} on {t.device}"
            if t.is_floating_point() and "dtype" in factory_kwargs:
                assert t.dtype == factory_kwargs["dtype"], f"{name} is {t.dtype}"
        assert repr(ours) == repr(theirs)
    return tally


def check_conversions(case: Case) -> Tally:
    """7. ``.to(dtype)``, ``.float()``, ``.double()``, ``.to("meta")`` and ``.to_empty(device="cpu")`` after meta
    construction keep the class and work: forward equals torch's class's after the same conversions."""
    tally = Tally()
    mi64 = case.input(dtype=torch.float64)
    mi32 = case.input(dtype=torch.float32)
    c = mi32.constructor_input
    cand, ref = build_pair(case, mi32, dtype=torch.float32)
    for convert, dtype, mi in ((lambda m: m.to(torch.float64), torch.float64, mi64),
                               (lambda m: m.float(), torch.float32, mi32),
                               (lambda m: m.double(), torch.float64, mi64),
                               (lambda m: m.to(torch.float32), torch.float32, mi32)):
        assert convert(cand) is cand and type(cand) is case.cls
        convert(ref)
        _assert_like(cand, ref, f"after conversion to {dtype}", tally)
        assert_same_results(run(cand, mi.forward_input), run(ref, mi.forward_input), f"{dtype} run", tally, dtype,
                            strides=("output",))

    # meta construction, then real storage: reset_parameters() gives torch's fresh module
    meta = case.cls(*c.args, **c.kwargs, device="meta")
    assert meta.to_empty(device="cpu") is meta and type(meta) is case.cls
    meta.reset_parameters()
    fresh = case.torch_cls(*c.args, **c.kwargs)
    _assert_like(meta, fresh, "to_empty", tally)
    assert_same_state(meta, fresh, "to_empty + reset_parameters", tally, torch.float32)
    assert_same_results(run(meta, mi32.forward_input), run(fresh, mi32.forward_input), "to_empty run", tally,
                        torch.float32, strides=("output",))

    # to the meta device: shapes and dtypes propagate as torch's do (or both raise the same error)
    assert cand.to("meta") is cand and type(cand) is case.cls
    ref.to("meta")
    _assert_like(cand, ref, "to('meta')", tally)
    x = only_tensor_argument(mi32).detach().to("meta")
    torch_exc, theirs = outcome(lambda: ref(x))
    our_exc, ours = outcome(lambda: cand(x))
    if torch_exc is not None:
        assert isinstance(our_exc, type(torch_exc)), f"torch raised {torch_exc!r} on meta, ours {our_exc!r}"
    else:
        assert our_exc is None, f"torch runs on meta, ours raised {our_exc!r}"
        assert_same_tensor(ours, theirs, "meta output", tally, atol=0, rtol=0, strides=True)
    return tally


def check_error(case: Case) -> Tally:
    """8. a ``module_error_inputs_func`` entry: torch's class raises the entry's type (and message) in training, as
    test_modules runs it; ours raises an error torch's type catches, with a message, in every mode where torch's
    raises (and computes torch's output where torch's does not); a failed forward changes none of our state."""
    tally = Tally()
    assert case.extra is not None
    index = int(case.extra.rsplit("_", 1)[-1])
    entry = error_inputs(case.name)[index]
    mi = entry.module_error_input
    c = mi.constructor_input
    torch_cls, cls = case.torch_cls, case.cls

    def check_raised(ours: BaseException | None, theirs: BaseException | None, where: str) -> None:
        assert theirs is not None
        assert isinstance(ours, type(theirs)), f"{where}: torch raised {theirs!r}, ours {ours!r}"
        assert str(ours).strip(), f"{where}: {type(ours).__name__} with an empty message"
        if case.impl == "torch" and case.training:  # the entry's message is torch's, for training mode
            assert re.search(entry.error_regex, str(ours)), f"{where}: {str(ours)!r} !~ {entry.error_regex!r}"
        tally.count += 1

    if entry.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        theirs, _ = outcome(lambda: torch_cls(*c.args, **c.kwargs))
        assert isinstance(theirs, entry.error_type) and re.search(entry.error_regex, str(theirs)), repr(theirs)
        ours, _ = outcome(lambda: cls(*c.args, **c.kwargs))
        check_raised(ours, theirs, "constructor")
        return tally

    assert entry.error_on == ModuleErrorEnum.FORWARD_ERROR, entry.error_on
    ref = randomize_(torch_cls(*c.args, **c.kwargs)).train(case.training)
    cand = cls(*c.args, **c.kwargs)
    cand.load_state_dict(ref.state_dict())
    cand.train(case.training)
    before = state_of(cand)
    args, kwargs, _ = clone_input(mi.forward_input)
    theirs, torch_out = outcome(lambda: ref(*args, **kwargs))
    if case.training:  # as module_db means it (test_modules builds the module and calls it in training mode)
        assert isinstance(theirs, entry.error_type) and re.search(entry.error_regex, str(theirs)), repr(theirs)
    args, kwargs, _ = clone_input(mi.forward_input)
    ours, our_out = outcome(lambda: cand(*args, **kwargs))
    if theirs is None:
        assert ours is None, f"torch's class computes this in {case.mode}, ours raised {ours!r}"
        assert_same_tensor(our_out, torch_out, "output", tally, atol=1e-5, rtol=1e-5, strides=True)
        assert_same_state(cand, ref, "after the call", tally, torch.float32)
        return tally
    check_raised(ours, theirs, "forward")
    if case.impl == "ours":  # normkit's promise; torch increments num_batches_tracked before it validates
        assert_same_results(state_of(cand), before, "state after the failed call", tally, torch.float32, scale=0)
    return tally


def check_gradcheck(case: Case, gradgrad: bool = True) -> Tally:
    """9. gradcheck (and gradgradcheck) in float64 with respect to the input and every parameter."""
    tally = Tally()
    mi = case.input(dtype=torch.float64)
    module = build(case.cls, mi, torch.float64, case.training)
    names = [n for n, _ in module.named_parameters()]
    x = only_tensor_argument(mi).detach().clone().requires_grad_()
    inputs = (x, *(p.detach().clone().requires_grad_() for p in module.parameters()))

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=False, fast_mode=False)
    tally.count += 1
    if gradgrad and case.info.supports_gradgrad:
        assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=False, fast_mode=True)
        tally.count += 1
    return tally


INPLACE_OPS: dict[str, Callable[[torch.Tensor], object]] = {
    "add_": lambda out: out.add_(1),
    "relu_": torch.relu_,
    "mul_": lambda out: out.mul_(2),
}


def check_inplace(case: Case) -> Tally:
    """10. an in-place op on the output (``bn -> relu(inplace=True)``, ``x = bn(x); x += 1``), then backward:
    works, and gives torch's class's output and gradients; with an input that needs a gradient, and with data in
    (no input gradient, as for a model's first layer)."""
    tally = Tally()
    dtype = case.torch_dtype
    for input_grad in (True, False):
        mi = case.input(requires_grad=input_grad)
        for op_name, op in INPLACE_OPS.items():
            what = f"{op_name} on the output ({'input needs grad' if input_grad else 'data input'})"
            cand, ref = build_pair(case, mi)
            results = []
            for module in (cand, ref):
                args, kwargs, leaves = clone_input(mi.forward_input)
                out = module(*args, **kwargs)
                op(out)
                result = {"output": out.detach(), "requires_grad": torch.tensor(out.requires_grad)}
                if out.requires_grad:  # not for data in and no parameters (torch's agrees: compared above)
                    wrt = [t for t in [*leaves, *module.parameters()] if t.requires_grad]
                    grads = torch.autograd.grad(out, wrt, upstream_like(out), allow_unused=True)
                    result.update({f"grad:{i}": g for i, g in enumerate(grads)})
                result.update(state_of(module))
                results.append(result)
            assert_same_results(results[0], results[1], what, tally, dtype, strides=("output",))
    return tally
