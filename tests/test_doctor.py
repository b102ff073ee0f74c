"""normkit.diagnostics.doctor: one planted model per rule, and a near-identical clean one that stays silent."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import normkit
from normkit.diagnostics import RULES, SCHEMA, Finding, Report, doctor

BN_CLASSES = [nn.BatchNorm2d, normkit.BatchNorm2d]


def x2d(n=16, c=3, size=6):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(0))


def cnn(bn=nn.BatchNorm2d, *, bias=False, momentum=0.1, eps=1e-5, dropout_first=False, head=True):
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=bias)]
    layers += [nn.Dropout(0.1)] if dropout_first else []
    layers += [bn(8, eps=eps, momentum=momentum)]
    layers += [nn.ReLU()]
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def full_state(model: nn.Module) -> dict:
    """Everything the doctor must not touch: tensors bit for bit, flags, requires_grad, the RNG."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "parameters": [id(p) for p in model.parameters()],
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = full_state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["modules"] == before["modules"]
    assert after["parameters"] == before["parameters"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert after["tensors"][key].dtype == value.dtype, key
        assert torch.equal(after["tensors"][key], value), f"{key} changed"


def rules_of(report: Report, module: str | None = None) -> set[str]:
    return {f.rule for f in report.findings if module is None or f.module == module}


# ---------------------------------------------------------------------------------------------------- per rule


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_train_mode_inference(bn):
    planted = cnn(bn).eval()
    planted[1].train()  # one BN left in training mode (e.g. bn.train() after model.eval())
    report = doctor(planted, x2d())
    assert rules_of(report) == {"train-mode-inference"}
    (finding,) = report.errors
    assert (finding.module, finding.severity) == ("1", "error")
    assert "model.eval()" in finding.fix
    assert rules_of(doctor(cnn(bn).eval(), x2d())) == set()
    assert "train-mode-inference" in rules_of(doctor(cnn(bn), x2d(), mode="inference"))
    assert rules_of(doctor(cnn(bn), x2d(), mode="train")) == set()


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_small_batch(bn):
    report = doctor(cnn(bn), x2d(n=4))
    (finding,) = report.findings
    assert (finding.rule, finding.module, finding.severity) == ("small-batch", "1", "warning")
    assert "batch of 4" in finding.message
    assert "GroupNorm(2, 8)" in finding.fix and "largest of 32/16/8/4/2/1" in finding.fix  # >= 4 channels a group
    assert rules_of(doctor(cnn(bn), x2d(n=8))) == set()
    assert rules_of(doctor(cnn(bn).eval(), x2d(n=4))) == set()  # eval uses the running statistics
    features = nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    (finding,) = doctor(features, torch.randn(4, 5)).findings
    assert "torch.nn.LayerNorm(6)" in finding.fix and "GroupNorm" not in finding.fix


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_bn_after_dropout(bn):
    report = doctor(cnn(bn, dropout_first=True), x2d())
    assert rules_of(report) == {"bn-after-dropout"}
    assert report.findings[0].module == "2"
    assert rules_of(doctor(cnn(bn, dropout_first=True))) == {"bn-after-dropout"}  # static: Sequential order
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Dropout(0.1)), nn.Sequential(bn(8)),
                           nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    assert rules_of(doctor(nested)) == rules_of(doctor(nested, x2d())) == {"bn-after-dropout"}
    assert rules_of(doctor(cnn(bn), x2d())) == set()


class DropoutThenActivation(nn.Module):
    def __init__(self, dropout_first: bool) -> None:
        super().__init__()
        self.fc, self.drop, self.act = nn.Linear(4, 8, bias=False), nn.Dropout(0.2), nn.ReLU()
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)
        self.dropout_first = dropout_first

    def forward(self, x):
        if self.dropout_first:
            return self.head(self.bn(self.act(self.drop(self.fc(x)))))
        return self.head(self.drop(self.act(self.bn(self.fc(x)))))


def test_bn_after_dropout_through_activation_in_custom_forward():
    x = torch.randn(16, 4)
    report = doctor(DropoutThenActivation(True), x)
    assert rules_of(report) == {"bn-after-dropout"}
    assert "fc -> drop -> act -> bn" in report.findings[0].message
    assert rules_of(doctor(DropoutThenActivation(False), x)) == set()


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_bn_before_output(bn):
    planted = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn(8))
    assert rules_of(doctor(planted, x2d())) == {"bn-before-output"}
    assert rules_of(doctor(planted)) == {"bn-before-output"}
    mlp = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Softmax(dim=1))
    finding = doctor(mlp, torch.randn(16, 4)).findings[0]
    assert (finding.rule, finding.module) == ("bn-before-output", "1")
    assert "right before the output" in finding.message
    assert rules_of(doctor(cnn(bn), x2d())) == set()


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_bias_before_bn(bn):
    report = doctor(cnn(bn, bias=True), x2d())
    (finding,) = report.findings
    assert (finding.rule, finding.module, finding.severity) == ("bias-before-bn", "0", "info")
    assert rules_of(doctor(cnn(bn, bias=True))) == {"bias-before-bn"}
    assert rules_of(doctor(cnn(bn), x2d())) == set()


def test_bias_of_a_linear_before_bn1d_on_sequences_is_not_redundant():
    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)

        def forward(self, x):  # (N, C, L): the Linear acts on L, its bias is not per channel
            return self.head(torch.relu(self.bn(self.fc(x))))

    assert rules_of(doctor(Sequence(), torch.randn(16, 5, 5))) == set()


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_frozen_stats_updating(bn):
    planted = cnn(bn)
    planted[1].requires_grad_(False)
    report = doctor(planted, x2d())
    assert rules_of(report) == {"frozen-stats-updating"}
    frozen_in_eval = cnn(bn)
    frozen_in_eval[1].requires_grad_(False)
    frozen_in_eval[1].eval()
    assert rules_of(doctor(frozen_in_eval, x2d())) == set()
    # mode="train" on a model in eval mode simulates the training loop's model.train()
    assert "frozen-stats-updating" in rules_of(doctor(frozen_in_eval.eval(), x2d(), mode="train"))


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_torch_momentum_keras_value(bn):
    report = doctor(cnn(bn, momentum=0.99))
    (finding,) = report.findings
    assert (finding.rule, finding.severity) == ("torch-momentum-keras-value", "error")
    assert "momentum=0.01" in finding.fix
    assert rules_of(doctor(cnn(bn, momentum=0.01))) == set()
    assert rules_of(doctor(cnn(bn, momentum=None))) == set()


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_eps_too_small(bn):
    assert rules_of(doctor(cnn(bn, eps=1e-5).half().eval())) == {"eps-too-small"}  # below float16's normal range
    assert rules_of(doctor(cnn(bn, eps=1e-3).half().eval())) == set()
    zero = doctor(cnn(bn, eps=0.0))
    assert [(f.rule, f.severity) for f in zero.findings] == [("eps-too-small", "error")]
    assert "eps-too-small" in rules_of(doctor(cnn(bn, eps=0.0), x2d()))  # the forward raises too (torch refuses)
    assert rules_of(doctor(cnn(bn, eps=1e-5), x2d())) == set()
    assert rules_of(doctor(cnn(bn, eps=1e-40))) == {"eps-too-small"}  # subnormal in float32


@pytest.mark.parametrize("bn", BN_CLASSES)
def test_dead_channels(bn):
    planted = cnn(bn).eval()
    planted[1].running_var[[2, 5]] = 0.0
    (finding,) = doctor(planted).findings
    assert (finding.rule, finding.severity) == ("dead-channels", "warning")
    assert "2 of 8 channels" in finding.message and "channels 2, 5" in finding.message
    planted[1].running_mean[0] = float("nan")
    (finding,) = doctor(planted).findings
    assert (finding.rule, finding.severity) == ("dead-channels", "error")
    assert rules_of(doctor(cnn(bn).eval())) == set()


class Recurrent(nn.Module):
    def __init__(self, shared: bool, steps: int = 3) -> None:
        super().__init__()
        self.cell = nn.Linear(8, 8, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm1d(8) for _ in range(1 if shared else steps)])
        self.head = nn.Linear(8, 2)
        self.steps = steps

    def forward(self, x):
        h = torch.zeros_like(x)
        for t in range(self.steps):
            h = torch.tanh(self.bns[0 if len(self.bns) == 1 else t](self.cell(h) + x))
        return self.head(h)


def test_bn_in_recurrence():
    x = torch.randn(16, 8)
    report = doctor(Recurrent(shared=True), x)
    (finding,) = report.findings
    assert (finding.rule, finding.module) == ("bn-in-recurrence", "bns.0")
    assert "3 times" in finding.message
    assert rules_of(doctor(Recurrent(shared=False), x)) == set()


def test_sync_bn_missing():
    report = doctor(cnn(), x2d(n=16), world_size=4)
    assert rules_of(report) == {"sync-bn-missing"}
    assert "global 64" in report.findings[0].message
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(cnn())
    assert rules_of(doctor(synced, world_size=4)) == set()  # no forward: SyncBatchNorm needs a process group
    assert rules_of(doctor(cnn(), x2d(n=16))) == set()  # one replica


def test_bn_effect_removed():
    planted = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.InstanceNorm2d(8), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    report = doctor(planted, x2d())
    (finding,) = report.findings
    assert (finding.rule, finding.module, finding.severity) == ("bn-effect-removed", "1", "info")
    clean = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.InstanceNorm2d(8),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    assert rules_of(doctor(clean, x2d())) == set()


def test_forward_failed_is_a_finding_not_an_exception():
    report = doctor(cnn(), torch.randn(2, 5, 6, 6))  # wrong channel count
    assert "forward-failed" in rules_of(report)
    assert not report.ok
    assert "RuntimeError" in report.errors[0].message


def test_every_rule_has_a_default_severity():
    assert all(severity in ("error", "warning", "info") for severity, _ in RULES.values())
    assert {"train-mode-inference", "small-batch", "bn-after-dropout", "bn-before-output", "bias-before-bn",
            "frozen-stats-updating", "torch-momentum-keras-value", "eps-too-small", "dead-channels",
            "bn-in-recurrence"} <= set(RULES)


# ---------------------------------------------------------------------------------------------- state and fixes


def everything_planted():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.99), nn.ReLU(),
        nn.Dropout(0.5), normkit.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
    )
    model[4].requires_grad_(False)
    with torch.no_grad():  # trained-looking statistics and a counter that must not move
        for bn in (model[1], model[4], model[7]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(17)
    model[7].eval()
    return model


@pytest.mark.parametrize("mode", [None, "train", "inference"])
@pytest.mark.parametrize("with_input", [False, True])
def test_doctor_never_changes_the_model(mode, with_input):
    model = everything_planted()
    before = full_state(model)
    rng = torch.random.get_rng_state()
    report = doctor(model, x2d(n=4) if with_input else None, mode=mode)
    assert len(report.findings) >= 4
    assert_same_state(model, before)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the Dropout in the traced forward used a forked RNG


def test_fix_drops_the_redundant_bias_and_keeps_outputs():
    model = cnn(bias=True)
    for _ in range(3):
        model(x2d(n=16))  # running statistics away from their initial values
    x = torch.randn(8, 3, 6, 6)
    import copy

    expected_train = copy.deepcopy(model)(x)  # a copy: a training forward moves the running statistics
    expected_eval = model.eval()(x)  # check for inference, so that train-mode-inference stays silent
    report = doctor(model, x, fix=True)
    assert report.changes == ["0: bias removed (its value moved into 1.running_mean)"]
    assert [f.fixed for f in report.findings] == [True]
    assert model[0].bias is None
    torch.testing.assert_close(model(x), expected_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.train()(x), expected_train, rtol=1e-4, atol=1e-4)


def test_fix_sets_eval_for_inference_but_only_on_the_flagged_bns():
    model = cnn(dropout_first=True).eval()
    model[2].train()
    report = doctor(model, fix=True)
    assert "train-mode-inference" in rules_of(report)
    assert model[2].training is False
    assert report.changes == ["2: set to eval mode"]
    assert [f.fixed for f in report.findings if f.rule == "bn-after-dropout"] == [False]  # not a safe fix


def test_fix_converts_to_group_norm_only_when_asked():
    model = cnn(bias=False)
    model[1].weight.data.fill_(2.0)
    report = doctor(model, x2d(n=2), fix=True)
    assert isinstance(model[1], nn.BatchNorm2d) and report.changes == []
    report = doctor(model, x2d(n=2), fix=True, convert_small_batch=True)
    assert isinstance(model[1], nn.GroupNorm)
    assert (model[1].num_groups, model[1].num_channels) == (2, 8)
    assert torch.equal(model[1].weight, torch.full((8,), 2.0))
    assert report.changes == ["1: replaced by GroupNorm(2, 8) with γ/β copied"]
    assert doctor(model, x2d(n=2)).ok


# ---------------------------------------------------------------------------------------------------- the report


def test_report_json_schema_and_renderings():
    report = doctor(everything_planted(), x2d(n=4), mode="inference")
    data = json.loads(report.to_json())
    assert data["schema"] == SCHEMA == "normkit.doctor/1"
    assert set(data) == {"schema", "mode", "dynamic", "ok", "counts", "findings", "changes"}
    assert data["mode"] == "inference" and data["dynamic"] is True and data["ok"] is False
    assert sum(data["counts"].values()) == len(data["findings"]) == len(report.findings)
    for finding in data["findings"]:
        assert set(finding) == {"rule", "severity", "module", "message", "fix", "fixed"}
        assert finding["rule"] in RULES
    severities = [f.severity for f in report.findings]
    assert severities == sorted(severities, key=("error", "warning", "info").index)  # worst first
    text = str(report)
    assert text.startswith("normkit doctor (inference, dynamic): FAILED")
    assert all(f.rule in text for f in report.findings)
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    report.render(console)
    table = console.file.getvalue()
    assert "train-mode-inference" in table and "FAILED" in table


def test_finding_validates_severity_and_errors_name_the_fix():
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "fatal", "", "m", "f")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        doctor(torch.zeros(3))
    with pytest.raises(ValueError, match="expected mode 'train', 'inference' or None, got 'eval'"):
        doctor(cnn(), mode="eval")


def test_inputs_as_tuple_and_dict():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 1)

        def forward(self, a, b=0.0):
            return self.fc(torch.relu(self.bn(a + b)))

    assert doctor(Two(), (torch.randn(4, 4), 1.0)).rules() == {"small-batch"}
    assert doctor(Two(), {"a": torch.randn(16, 4)}).rules() == set()
