"""The harness itself: module_db really gives inputs for all eight modules, every check has cases for both impls,
and each check fails on a deliberately broken drop-in (so a pass of ``ours`` means something)."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import harness
from harness import (
    DTYPES,
    IMPLS,
    MODES,
    NAMES,
    Case,
    check_conversions,
    check_error,
    check_factory_kwargs,
    check_forward,
    check_gradcheck,
    check_inplace,
    check_memory_format,
    check_noncontiguous,
    check_serialization,
    check_train_eval,
    error_inputs,
    module_class,
    module_info,
    module_inputs,
)

# ------------------------------------------------------------------------------------------------ module_db


@pytest.mark.parametrize("name", NAMES)
def test_module_db_gives_inputs(name: str) -> None:
    info = module_info(name)
    assert info.module_cls is getattr(torch.nn, name)
    ours = module_class("ours", name)
    assert ours.__name__ == name and ours.__module__.startswith("normkit.")
    for dtype in DTYPES.values():
        for training in MODES.values():
            inputs = module_inputs(name, dtype, training)
            assert len(inputs) >= 1
            for mi in inputs:
                tensors = [*mi.forward_input.args, *mi.forward_input.kwargs.values()]
                assert tensors and all(t.dtype == dtype for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("name", NAMES)
def test_module_db_error_inputs(name: str) -> None:
    entries = error_inputs(name)
    if name.startswith(("BatchNorm", "GroupNorm")):
        assert len(entries) >= 2
    else:  # module_db has no error inputs for these (yet); the day it has, they are checked automatically
        assert module_info(name).module_error_inputs_func is None and entries == []


@pytest.mark.parametrize("name", [n for n in NAMES if module_info(n).train_and_eval_differ])
def test_torch_train_and_eval_differ_somewhere(name: str) -> None:
    """For the ModuleInfos with train_and_eval_differ, some input really tells train from eval in torch's class
    (so the train/eval comparison of ours is not between equal outputs only)."""
    descs = [mi.desc or "default" for mi in module_inputs(name, torch.float32, True)]
    differ = [check_train_eval(Case("torch", name, desc, "f32"))[1] for desc in descs]
    assert any(differ), f"no input of nn.{name} gives different train and eval outputs"


def test_every_check_has_cases_for_both_impls() -> None:
    for path in sorted(Path(__file__).parent.glob("test_peer_*.py")):
        if path.stem != Path(__file__).stem:
            importlib.import_module(path.stem)  # already imported when the whole directory is collected
    registered = harness.REGISTERED
    assert set(registered) == {
        "forward", "noncontiguous", "noncontiguous_state", "memory_format", "train_eval", "serialization",
        "factory_kwargs", "conversions", "errors", "gradcheck", "inplace"}, sorted(registered)
    for check, cases in registered.items():
        by_impl = {impl: [c for c in cases if c.impl == impl] for impl in IMPLS}
        assert by_impl["ours"], f"{check} has no cases"
        mirrored = [Case(**{**c.__dict__, "impl": "ours"}) for c in by_impl["torch"]]
        assert mirrored == by_impl["ours"], f"{check}: the torch control does not mirror ours"
    for check in ("forward", "train_eval", "serialization", "factory_kwargs", "conversions", "inplace"):
        assert {c.name for c in registered[check]} == set(NAMES), check
    assert {c.name for c in registered["memory_format"]} >= {"BatchNorm2d", "BatchNorm3d", "GroupNorm",
                                                             "InstanceNorm2d", "InstanceNorm3d", "LayerNorm"}
    assert {c.name for c in registered["errors"]} == {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm"}


# ------------------------------------------------------------------------------------------------ mutants


class _Shifted(torch.nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) + 1e-3


class _ContiguousOutput(torch.nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input).contiguous()


class _ForgetsCount(torch.nn.BatchNorm1d):
    def forward(self, input):
        out = super().forward(input)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.sub_(1)
        return out


class _EvalUsesBatchStats(torch.nn.InstanceNorm1d):
    def _apply_instance_norm(self, input):
        return torch.nn.functional.instance_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _DetachesStrided(torch.nn.LayerNorm):
    def forward(self, input):
        if not input.is_contiguous():
            input = input.detach().contiguous()
        return super().forward(input)


class _WrongErrorType(torch.nn.BatchNorm2d):
    def forward(self, input):
        if self.eps <= 0:
            raise RuntimeError("eps must be positive")
        return super().forward(input)


class _Unpicklable(torch.nn.GroupNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook = lambda: None


class _IgnoresDtype(torch.nn.BatchNorm3d):
    def __init__(self, *args, dtype=None, **kwargs):
        super().__init__(*args, **kwargs)


class _SavesOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad + 0 * y


class _OutputSavedForBackward(torch.nn.BatchNorm2d):
    def forward(self, input):
        return _SavesOutput.apply(super().forward(input))


class _HalfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / 2


class _WrongBackward(torch.nn.LayerNorm):
    def forward(self, input):
        return _HalfGradient.apply(super().forward(input))


class _Warns(torch.nn.BatchNorm1d):
    def forward(self, input):
        warnings.warn("batch too small", UserWarning, stacklevel=2)
        return super().forward(input)


class _LosesClassOnTo(torch.nn.BatchNorm1d):
    def to(self, *args, **kwargs):
        result = torch.nn.BatchNorm1d(self.num_features)
        result.load_state_dict(self.state_dict())
        return result


MUTANTS = [  # (id, check, case, exception the check must raise)
    ("forward-values", check_forward, Case("ours", "BatchNorm2d", "momentum", "f32", "eval", override=_Shifted),
     AssertionError),
    ("forward-warnings", check_forward, Case("ours", "BatchNorm1d", "affine", "f64", "train", override=_Warns),
     AssertionError),
    ("memory_format-strides", check_memory_format,
     Case("ours", "BatchNorm2d", "momentum", "f32", "train", override=_ContiguousOutput), AssertionError),
    ("train_eval-num_batches_tracked", check_train_eval,
     Case("ours", "BatchNorm1d", "affine", "f32", override=_ForgetsCount), AssertionError),
    ("train_eval-differ", check_train_eval,
     Case("ours", "InstanceNorm1d", "tracking_stats", "f32", override=_EvalUsesBatchStats), AssertionError),
    ("noncontiguous-grads", check_noncontiguous,
     Case("ours", "LayerNorm", "3d_elementwise_affine", "f64", "train", override=_DetachesStrided), AssertionError),
    ("errors-type", check_error,
     Case("ours", "BatchNorm2d", mode="train", extra="forward_error_0", override=_WrongErrorType), AssertionError),
    # torch's own class changes num_batches_tracked before it validates: what normkit promises not to do
    ("errors-state", check_error,
     Case("ours", "BatchNorm2d", mode="train", extra="forward_error_1", override=torch.nn.BatchNorm2d),
     AssertionError),
    ("serialization-pickle", check_serialization,
     Case("ours", "GroupNorm", "2d_affine", "f32", "train", override=_Unpicklable), Exception),
    ("factory_kwargs-dtype", check_factory_kwargs, Case("ours", "BatchNorm3d", "momentum", override=_IgnoresDtype),
     AssertionError),
    ("conversions-class", check_conversions, Case("ours", "BatchNorm1d", "affine", override=_LosesClassOnTo),
     AssertionError),
    ("gradcheck", check_gradcheck,
     Case("ours", "LayerNorm", "1d_no_elementwise_affine", "f64", "train", override=_WrongBackward),
     GradcheckError),
    ("inplace", check_inplace,
     Case("ours", "BatchNorm2d", "momentum", "f32", "train", override=_OutputSavedForBackward),
     RuntimeError),
]


@pytest.mark.parametrize(("check", "case", "error"), [pytest.param(*m[1:], id=m[0]) for m in MUTANTS])
def test_check_catches_a_broken_module(check, case: Case, error: type[BaseException]) -> None:
    control = Case(**{**case.__dict__, "override": None, "impl": "torch"})
    result = check(control)  # the same check passes on torch's class ...
    (result[0] if isinstance(result, tuple) else result).done()
    with pytest.raises(error):  # ... and fails on the broken one
        check(case)


def test_known_bugs_become_strict_xfails(monkeypatch) -> None:
    monkeypatch.setattr(harness, "KNOWN_BUGS", [("selftest", {"name": "LayerNorm", "mode": "eval"}, "a reason")])
    monkeypatch.setattr(harness, "REGISTERED", {})
    cases = [Case(impl, "LayerNorm", "default", "f32", mode) for impl in IMPLS for mode in ("train", "eval")]
    marked = {p.id: [m for m in p.marks if m.name == "xfail"] for p in harness.params("selftest", cases)}
    assert [i for i, marks in marked.items() if marks] == ["ours-LayerNorm-default-f32-eval"]
    (mark,) = marked["ours-LayerNorm-default-f32-eval"]
    assert mark.kwargs == {"strict": True, "reason": "normkit bug: a reason"}
