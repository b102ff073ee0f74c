"""normkit.diagnostics.doctor on odd module trees (a model that contains itself, shared modules) and reports that
people read: one finding for a model left in training mode, findings grouped by (severity, rule), filtering."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from normkit.diagnostics import RULES, Finding, Report, doctor
from normkit.diagnostics._doctor import _group_count


def rules_of(report: Report, module: str | None = None) -> set[str]:
    return {f.rule for f in report.findings if module is None or f.module == module}


# ------------------------------------------------------------------------------------------ cycles and sharing

CYCLES = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from normkit.diagnostics import doctor

    def cyclic():
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        m.add_module("again", m)
        return m

    def summary(report):
        return [[f.rule, f.module, f.fixed] for f in report.findings]

    out = {}
    out["static"] = summary(doctor(cyclic()))
    failed = doctor(cyclic(), torch.randn(16, 4))
    out["dynamic"] = summary(failed)
    out["dynamic_text"] = [f.message + " | " + f.fix for f in failed.findings if f.rule == "forward-failed"]
    in_eval = cyclic()
    for module in in_eval.modules():  # in_eval.eval() would recurse without end: torch's Module.train has no memo
        module.training = False
    out["train_on_eval_model"] = summary(doctor(in_eval, mode="train"))
    out["still_eval"] = [m.training for m in in_eval.modules()]
    model = cyclic()
    fixed = doctor(model, mode="inference", fix=True)
    out["fix"] = summary(fixed)
    out["changes"] = fixed.changes
    out["bias_after_fix"] = model[0].bias is None
    out["bn_training_after_fix"] = model[1].training

    nested = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))
    nested[1].add_module("loop", nested[1])
    out["nested"] = summary(doctor(nested))
    first, second = nn.Identity(), nn.Identity()  # from Sequential order: first feeds second feeds first
    loop = nn.Sequential(first, second, first, nn.BatchNorm2d(8), nn.BatchNorm2d(8))
    out["identity_loop"] = summary(doctor(loop))

    class Block(nn.Module):  # a child keeping a reference to its owner registers the owner as a submodule
        def __init__(self, owner):
            super().__init__()
            self.owner = owner
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x)

    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)
            self.block = Block(self)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.block(self.fc(x))))

    out["owner"] = summary(doctor(Owner(), torch.randn(4, 4)))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def cycles() -> dict:
    """The doctor on models that contain themselves, in a subprocess: a regression hangs, and the timeout ends it."""
    done = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_sequential_that_contains_itself_is_checked_statically(cycles):
    # named by first paths: "0" and "1", never "again.0" or "again.again...."
    assert cycles["static"] == [["bias-before-bn", "0", False]]
    assert cycles["train_on_eval_model"] == [["bias-before-bn", "0", False]]
    assert cycles["still_eval"] == [False, False, False]  # the doctor's .train() happened on its copy only
    assert cycles["nested"] == []  # 1.loop is 1: a cycle below the root, BN then ReLU: nothing to report
    assert cycles["identity_loop"] == [["bn-before-output", "4", False], ["bn-effect-removed", "3", False]]


def test_its_forward_recursion_is_one_clean_forward_failed_finding(cycles):
    assert cycles["dynamic"] == [["forward-failed", "1", False], ["bias-before-bn", "0", False]]
    (text,) = cycles["dynamic_text"]
    assert "RecursionError" in text and "dynamic rules were skipped" in text
    assert "the model contains itself: 'again' is the module '(root)'" in text


def test_fixes_work_on_a_model_that_contains_itself(cycles):
    # checked for inference while in training mode: the root finding, whose fix .eval()s the BN (not the cycle)
    assert cycles["fix"] == [["train-mode-inference", "", True], ["bias-before-bn", "0", True]]
    assert cycles["changes"] == ["1: set to eval mode (1 BatchNorm layer; the other modules, Dropout included, keep "
                                 "their flag: call model.eval())",
                                 "0: bias removed (its value moved into 1.running_mean)"]
    assert cycles["bias_after_fix"] is True and cycles["bn_training_after_fix"] is False


def test_an_owner_reference_cycle_with_a_working_forward_gets_the_dynamic_rules(cycles):
    assert cycles["owner"] == [["small-batch", "block.bn", False]]


def shared_model() -> tuple[nn.Module, nn.BatchNorm2d]:
    bn = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn, nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), bn, nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return model, bn


def test_a_shared_bn_is_one_module_named_by_its_first_path():
    model, bn = shared_model()
    assert doctor(model).findings == []  # static: Sequential order, the second registration included
    report = doctor(model, torch.randn(16, 3, 6, 6))
    (finding,) = report.findings
    assert (finding.rule, finding.module) == ("bn-in-recurrence", "1")
    assert "2 times" in finding.message
    small = doctor(model, torch.randn(2, 3, 6, 6))
    assert [(f.rule, f.module) for f in small.findings] == [("bn-in-recurrence", "1"), ("small-batch", "1")]
    biased = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), bn, nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False), bn)
    assert [(f.rule, f.module) for f in doctor(biased).findings if f.rule == "bias-before-bn"] == [
        ("bias-before-bn", "0")]  # the first producer of "1" wins, as the first call does in a trace


def test_a_module_registered_twice_in_one_sequential_keeps_its_place_in_the_order():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 8), relu, nn.BatchNorm1d(8), nn.Linear(8, 2))
    # the shared ReLU runs between the second Linear and the BN: that Linear's bias does not cancel
    assert doctor(model).findings == doctor(model, torch.randn(16, 4)).findings == []
    control = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    assert [(f.rule, f.module) for f in doctor(control).findings] == [("bias-before-bn", "2")]


def test_converting_a_shared_bn_replaces_every_registration_with_one_group_norm():
    model, bn = shared_model()
    with torch.no_grad():
        bn.weight.fill_(3.0)
    report = doctor(model, torch.randn(2, 3, 6, 6), fix=True, convert_small_batch=True)
    assert isinstance(model[1], nn.GroupNorm) and model[1] is model[4]  # still shared
    assert (model[1].num_groups, model[1].num_channels) == (2, 8)
    assert torch.equal(model[1].weight, torch.full((8,), 3.0))
    assert report.changes == ["1: replaced by GroupNorm(2, 8) with γ/β copied (at 2 places, shared)"]
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == []


# ------------------------------------------------------------------------------- a model left in training mode


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (20 BNs, names included) at small widths."""

    def __init__(self, widths=(4, 8, 8, 16), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, width in enumerate(widths, 1):
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(cin, width, 1 if i == 1 else 2),
                                                       BasicBlock(width, width, 1)))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = self.get_submodule(f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def batch2() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("world_size", [1, 4])
def test_a_model_not_switched_to_eval_gets_one_error_at_the_root(world_size):
    report = doctor(ResNet18(), batch2(), mode="inference", world_size=world_size)
    (finding,) = report.findings  # not 20 errors + 20 small-batch (+ 20 sync-bn-missing) warnings
    assert (finding.rule, finding.severity, finding.module) == ("train-mode-inference", "error", "")
    assert finding.message.startswith("20 BatchNorm layers in training mode: bn1, layer1.0.bn1, layer1.0.bn2 (+17).")
    assert finding.fix.startswith("call model.eval() before inference")
    assert str(report).splitlines()[1].startswith("error   train-mode-inference [(root)] 20 BatchNorm layers")
    # checked for training, the same batch is a real small-batch problem in every BN: one group in the text
    train = doctor(ResNet18(), batch2(), mode="train")
    assert [f.rule for f in train.findings] == ["small-batch"] * 20
    assert "warning small-batch: 20 layers: bn1, layer1.0.bn1, layer1.0.bn2 (+17)" in str(train).splitlines()


def test_fix_sets_eval_on_the_bns_listed_by_the_root_finding_only():
    model = ResNet18()
    model.add_module("drop", nn.Dropout(0.5))
    report = doctor(model, batch2(), mode="inference", fix=True)
    assert [(f.rule, f.fixed) for f in report.findings] == [("train-mode-inference", True)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and not any(bn.training for bn in bns)
    assert model.training and model.drop.training  # the rest keeps its flag: model.eval() is the user's call
    (change,) = report.changes
    assert change.startswith("bn1, layer1.0.bn1, layer1.0.bn2, layer1.1.bn1,") and "20 BatchNorm layers" in change
    assert doctor(model, batch2(), mode="inference").ok


def test_bns_put_back_to_training_in_an_eval_model_are_reported_one_by_one():
    model = ResNet18().eval()
    model.layer2[0].bn1.train()
    report = doctor(model, batch2(), world_size=4)  # mode from the root: inference
    assert [(f.rule, f.module) for f in report.findings] == [("train-mode-inference", "layer2.0.bn1")]
    assert "although the model is in eval mode" in report.findings[0].message
    model.layer3[1].bn2.train()
    report = doctor(model, batch2(), fix=True)
    assert [f.module for f in report.findings] == ["layer2.0.bn1", "layer3.1.bn2"]
    assert report.changes == ["layer2.0.bn1: set to eval mode", "layer3.1.bn2: set to eval mode"]
    assert "error   train-mode-inference: 2 layers: layer2.0.bn1, layer3.1.bn2" in str(report)
    assert not any(m.training for m in model.modules())


def test_a_root_that_is_a_bn_in_training_mode():
    bn = nn.BatchNorm1d(4)
    report = doctor(bn, torch.randn(2, 4), mode="inference", fix=True)
    finding = report.findings[0]
    assert report.rules() == {"train-mode-inference", "bn-before-output"}
    assert finding.module == "" and finding.message.startswith("1 BatchNorm layer in training mode: (root).")
    assert report.changes == ["(root): set to eval mode"] and not bn.training


# ---------------------------------------------------------------------------------------------------- grouping


def finding(module: str, rule: str = "bn-after-dropout", severity: str = "warning", message: str = "same",
            fix: str = "move it", fixed: bool = False) -> Finding:
    return Finding(rule, severity, module, message, fix, fixed)


def test_groups_follow_report_order_and_keep_every_finding():
    findings = [finding("a", "train-mode-inference", "error"), finding("b"), finding("c"),
                finding("d", "bias-before-bn", "info")]
    report = Report(findings, mode="inference")
    assert [(s, r, [f.module for f in fs]) for s, r, fs in report.groups()] == [
        ("error", "train-mode-inference", ["a"]), ("warning", "bn-after-dropout", ["b", "c"]),
        ("info", "bias-before-bn", ["d"])]
    assert len(report.to_dict()["findings"]) == 4  # the JSON keeps every finding, schema unchanged
    assert set(report.to_dict()) == {"schema", "mode", "dynamic", "ok", "counts", "findings", "changes"}


def test_group_text_with_equal_and_with_different_messages():
    same = Report([finding(m) for m in ("a", "b", "c")])
    assert str(same).splitlines()[1:] == [
        "warning bn-after-dropout: 3 layers: a, b, c",
        "        same",
        "        fix: move it",
    ]
    mixed = Report([finding(m, message=f"msg {m}", fixed=m != "e") for m in ("a", "b", "c", "d", "e")])
    assert str(mixed).splitlines()[1:] == [
        "warning bn-after-dropout: 5 layers: a, b, c (+2)",
        "        e.g. [a]: msg a",
        "        fix (applied to 4 of 5): move it",
    ]
    one = Report([finding("", message="only")])
    assert str(one).splitlines()[1:] == ["warning bn-after-dropout [(root)] only", "        fix: move it"]


@pytest.mark.parametrize("width", [200, 80])
def test_rich_rendering_groups_too(width):
    from rich.console import Console

    report = Report([finding(m, message=f"msg {m}") for m in ("a", "b", "c", "d")] + [finding("x", "bias-before-bn",
                                                                                            "info", "bias")])
    console = Console(file=io.StringIO(), width=width)
    report.render(console)
    text = console.file.getvalue()
    assert "4 layers: a, b, c (+1)" in text and "e.g. [a]: msg a" in text and "msg b" not in text
    assert "bias-before-bn" in text and "OK: 0 error(s), 4 warning(s), 1 info" in text


# ------------------------------------------------------------------------------------------ filter and summary


def mixed_report() -> Report:
    return Report([finding("a", "torch-momentum-keras-value", "error"), finding("b"), finding("c", "small-batch"),
                   finding("d", "bias-before-bn", "info")], mode="inference", dynamic=True, changes=["x"])


@pytest.mark.parametrize(("min_severity", "expected"), [
    (None, ["a", "b", "c", "d"]), ("error", ["a"]), ("warning", ["a", "b", "c"]), ("info", ["a", "b", "c", "d"])])
def test_filter_by_severity(min_severity, expected):
    report = mixed_report()
    kept = report.filter(min_severity=min_severity)
    assert [f.module for f in kept.findings] == expected
    assert (kept.mode, kept.dynamic, kept.changes) == ("inference", True, ["x"])
    assert kept is not report and len(report.findings) == 4


def test_filter_by_rule_and_both():
    report = mixed_report()
    assert [f.module for f in report.filter(rules=["small-batch", "bias-before-bn"]).findings] == ["c", "d"]
    assert [f.module for f in report.filter(rules="small-batch").findings] == ["c"]  # one id as a string
    assert report.filter(rules=["small-batch", "bias-before-bn"], min_severity="warning").rules() == {"small-batch"}
    assert report.filter(rules=[]).findings == []
    without_errors = report.filter(rules=["bn-after-dropout"])
    assert without_errors.ok and without_errors.summary() == "OK: 0 error(s), 1 warning(s), 0 info"
    assert report.summary() == "FAILED: 1 error(s), 2 warning(s), 1 info"


def test_filter_refuses_unknown_values_and_names_the_valid_ones():
    report = mixed_report()
    with pytest.raises(ValueError, match=r"expected min_severity in \['error', 'warning', 'info'\].*got 'fatal'"):
        report.filter(min_severity="fatal")
    with pytest.raises(ValueError, match="got unknown 'no-such-rule'") as raised:
        report.filter(rules=["small-batch", "no-such-rule"])
    assert all(rule in str(raised.value) for rule in RULES)


# ----------------------------------------------------------------------------------------- GroupNorm suggestion


@pytest.mark.parametrize(("channels", "groups"), [
    (1, 1), (2, 1), (3, 1), (4, 1), (8, 2), (12, 2), (16, 4), (24, 4), (64, 16), (96, 16), (256, 32), (2048, 32)])
def test_group_count_keeps_at_least_four_channels_per_group(channels, groups):
    assert _group_count(channels) == groups
    assert channels % groups == 0 and (channels // groups >= 4 or groups == 1)


def test_the_small_batch_fix_names_the_group_count():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 2))
    (found,) = doctor(model, torch.randn(2, 3, 6, 6)).findings
    assert "normkit.nn.GroupNorm(16, 64)" in found.fix
