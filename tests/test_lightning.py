"""normkit.integrations.lightning: each callback in a real lightning.Trainer on CPU, asserted on the model's state."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

import normkit  # noqa: E402
from normkit.diagnostics import Monitor  # noqa: E402
from normkit.integrations.lightning import (  # noqa: E402
    AdaBN,
    BatchNormDoctor,
    BatchNormDoctorError,
    BatchNormMonitor,
    FreezeBatchNorm,
    PreciseBN,
)

# Lightning's own warnings on a tiny CPU run, none of them about what is tested here.
pytestmark = [
    # lightning/pytorch/utilities/_pytree.py with torch 2.13's pytree
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

BATCH = 8


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def values(self, key: str) -> dict[int, float]:
        return {step: metrics[key] for step, metrics in self.calls if key in metrics}


class Classifier(L.LightningModule):
    """Conv -> BN -> ReLU -> pool -> dropout -> linear; counts its training and validation steps."""

    def __init__(self, momentum: float = 0.1, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=momentum),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                 nn.Linear(8, 2))
        self.train_steps = 0
        self.val_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_steps += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoForward(Classifier):
    """The same network, run by training_step through ``self.net`` (no ``forward``)."""

    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        return F.cross_entropy(self.net(batch[0]), batch[1])


def data(n: int = 48, *, shift: float = 0.0, scale: float = 1.0, seed: int = 0, shuffle: bool = False,
         batch_size: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=generator) * scale + shift
    y = torch.randint(0, 2, (n,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def fit(model, callbacks=(), *, train=None, val=None, tmp_path, **options):
    settings = {"max_epochs": 1, "num_sanity_val_steps": 2, "log_every_n_steps": 1, **options}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=MemoryLogger(), callbacks=list(callbacks),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, **settings)
    torch.manual_seed(1)  # the same shuffling and dropout in every run
    trainer.fit(model, train if train is not None else data(), val)
    return trainer


def seeded(cls=Classifier, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs)


def bn_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("net.1.")}


# --- packaging --------------------------------------------------------------------------------------------------


def test_import_normkit_does_not_import_lightning():
    code = ("import sys, normkit, normkit.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_lightning_is_a_clear_import_error():
    code = ("import sys; sys.modules['lightning'] = None\n"
            "try:\n    import normkit.integrations.lightning\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'normkit[lightning]'" in out


# --- BatchNormDoctor ----------------------------------------------------------------------------------------------


def test_doctor_stops_fit_before_the_first_step_on_an_error(tmp_path):
    model = seeded(momentum=0.99)  # a Keras momentum pasted into torch: an error finding
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(BatchNormDoctorError, match="torch-momentum-keras-value") as info:
        fit(model, [BatchNormDoctor()], tmp_path=tmp_path, val=data(16))
    assert model.train_steps == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert "fail_on=None" in str(info.value) and info.value.report.errors[0].module == "net.1"


def test_doctor_with_an_example_checks_before_the_sanity_validation(tmp_path):
    model = seeded(momentum=0.99)
    with pytest.raises(BatchNormDoctorError):
        fit(model, [BatchNormDoctor(input_shape=(16, 3, 6, 6))], tmp_path=tmp_path, val=data(16))
    assert model.train_steps == 0 and model.val_steps == 0


def test_doctor_uses_the_first_training_batch_and_logs_warnings(tmp_path, caplog):
    doctor = BatchNormDoctor()
    with caplog.at_level(logging.WARNING, logger="normkit.integrations.lightning"):
        trainer = fit(seeded(), [doctor], train=data(batch_size=4), tmp_path=tmp_path, max_steps=2)
    assert doctor.report.rules() == {"small-batch"} and doctor.report.dynamic
    assert "a batch of 4" in doctor.report.warnings[0].message
    assert any("small-batch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert trainer.logger.values("normkit/doctor_warnings") == {0: 1.0}
    assert trainer.logger.values("normkit/doctor_errors") == {0: 0.0}
    assert trainer.lightning_module.train_steps == 2

    large = BatchNormDoctor()
    fit(seeded(), [large], train=data(batch_size=16), tmp_path=tmp_path, max_steps=1)
    assert large.report.findings == []


def test_doctor_fail_on_warning_and_never(tmp_path):
    with pytest.raises(BatchNormDoctorError, match="small-batch"):
        fit(seeded(), [BatchNormDoctor(fail_on="warning")], train=data(batch_size=4), tmp_path=tmp_path)
    model = seeded(momentum=0.99)
    fit(model, [BatchNormDoctor(fail_on=None)], tmp_path=tmp_path, max_steps=1)
    assert model.train_steps == 1


def test_doctor_keeps_the_training_identical(tmp_path):
    """The first batch is drawn with the random generators isolated: same shuffling, same dropout, same weights."""
    plain, checked = seeded(), seeded()
    fit(plain, tmp_path=tmp_path, train=data(shuffle=True))
    fit(checked, [BatchNormDoctor()], tmp_path=tmp_path, train=data(shuffle=True))
    for (name, a), b in zip(plain.state_dict().items(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_doctor_needs_a_forward_or_a_submodule(tmp_path):
    with pytest.raises(TypeError, match="defines no forward.*submodule='net'"):
        fit(seeded(NoForward), [BatchNormDoctor()], tmp_path=tmp_path)
    doctor = BatchNormDoctor(submodule="net")
    fit(seeded(NoForward), [doctor], tmp_path=tmp_path, max_steps=1)
    assert doctor.report.ok and doctor.report.dynamic
    with pytest.raises(BatchNormDoctorError, match=r"\[1\]"):  # module names are relative to the submodule
        fit(seeded(NoForward, momentum=0.5), [doctor], tmp_path=tmp_path)
    with pytest.raises(ValueError, match="no submodule 'nett'.*'net'"):
        fit(seeded(), [BatchNormDoctor(submodule="nett")], tmp_path=tmp_path)


def test_doctor_dict_batches_need_input_from_batch(tmp_path):
    class DictBatches(Classifier):
        def training_step(self, batch, batch_idx):
            self.train_steps += 1
            return F.cross_entropy(self(batch["x"]), batch["y"])

    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 2, (32,))
    loader = torch.utils.data.DataLoader([{"x": a, "y": b} for a, b in zip(x, y, strict=True)], batch_size=4)
    with pytest.raises(TypeError, match="input_from_batch=lambda batch"):
        fit(seeded(DictBatches), [BatchNormDoctor()], train=loader, tmp_path=tmp_path)
    doctor = BatchNormDoctor(input_from_batch=lambda batch: batch["x"])
    fit(seeded(DictBatches), [doctor], train=loader, tmp_path=tmp_path, max_steps=1)
    assert doctor.report.dynamic and "small-batch" in doctor.report.rules()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"fail_on": "errors"}, ValueError, "fail_on 'error', 'warning' or None"),
    ({"mode": "eval"}, ValueError, "mode 'train' or 'inference'"),
    ({"input_shape": (0, 3)}, ValueError, "positive ints"),
    ({"example_input": torch.zeros(2), "input_shape": (2,)}, ValueError, "not both"),
    ({"example_input": "first"}, ValueError, "'first_batch', None"),
    ({"input_from_batch": "x"}, TypeError, "function of a batch"),
])
def test_doctor_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormDoctor(**kwargs)


# --- BatchNormMonitor ---------------------------------------------------------------------------------------------


def test_monitor_logs_statistics_every_n_steps(tmp_path):
    model = seeded()
    initial = copy.deepcopy(model)
    callback = BatchNormMonitor(every_n_steps=2)
    trainer = fit(model, [callback], val=data(16), tmp_path=tmp_path, max_steps=5)
    logged = trainer.logger.values("bn/net.1/distance")
    assert sorted(logged) == [0, 2, 4]
    for field in ("var_ratio", "mean_shift", "dead_fraction"):
        assert sorted(trainer.logger.values(f"bn/net.1/{field}")) == [0, 2, 4]
    assert [r["step"] for r in callback.monitor.records] == [0, 2, 4]
    assert all(r["training"] for r in callback.monitor.records)  # validation forwards are not recorded
    # Step 0 saw the first batch with the initial weights and statistics: what a Monitor reports directly.
    first = next(iter(data()))[0]
    with Monitor(initial.net) as direct:
        initial.net(first)
    for field in ("distance", "var_ratio", "mean_shift"):
        assert trainer.logger.values(f"bn/net.1/{field}")[0] == pytest.approx(direct.records[0][field], rel=1e-6)
    assert logged[4] != logged[0]


def test_monitor_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps to be a positive int"):
        BatchNormMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="expected fields from"):
        BatchNormMonitor(fields=("step",))


# --- PreciseBN and AdaBN ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("validate", [True, False])
def test_precise_bn_equals_a_direct_recalibration(tmp_path, validate):
    train = data(48)
    plain, precise = seeded(), seeded()
    val = data(16) if validate else None
    fit(plain, tmp_path=tmp_path, train=train, val=val, max_epochs=2)
    fit(precise, [PreciseBN(num_batches=4)], tmp_path=tmp_path, train=train, val=val, max_epochs=2)
    # The weights are those of the run without the callback (the random generators were isolated, so epoch 2 has
    # the same dropout masks): only the statistics moved.
    weights = {k: v for k, v in plain.state_dict().items() if not k.startswith("net.1.")}
    assert all(torch.equal(v, precise.state_dict()[k]) for k, v in weights.items())
    # The statistics are the exact ones of the first 4 training batches under the final weights.
    expected = copy.deepcopy(plain.net).eval()
    normkit.tools.recalibrate(expected, [x for x, _ in list(train)[:4]])
    assert torch.allclose(precise.net[1].running_mean, expected[1].running_mean, atol=1e-6)
    assert torch.allclose(precise.net[1].running_var, expected[1].running_var, atol=1e-6)
    assert not torch.allclose(plain.net[1].running_var, expected[1].running_var, atol=1e-3)
    assert int(precise.net[1].num_batches_tracked) == int(plain.net[1].num_batches_tracked) + 2 * 4


def test_precise_bn_every_n_epochs(tmp_path):
    plain, skipped = seeded(), seeded()
    fit(plain, tmp_path=tmp_path, val=data(16))
    callback = PreciseBN(every_n_epochs=2)
    fit(skipped, [callback], tmp_path=tmp_path, val=data(16))
    assert callback.last_step is None
    assert all(torch.equal(v, skipped.state_dict()[k]) for k, v in plain.state_dict().items())


def test_precise_bn_uses_given_data_and_submodule(tmp_path):
    other = data(32, shift=2.0, seed=1)
    model = seeded(NoForward)
    fit(model, [PreciseBN(other, num_batches=None, submodule="net")], tmp_path=tmp_path)
    expected = copy.deepcopy(model.net)
    normkit.tools.recalibrate(expected, other)
    assert torch.allclose(model.net[1].running_mean, expected[1].running_mean, atol=1e-6)
    with pytest.raises(TypeError, match="defines no forward"):
        fit(seeded(NoForward), [PreciseBN()], tmp_path=tmp_path)


class _StatsDuringValidation(L.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            self.seen.append(pl_module.net[1].running_mean.clone())


@pytest.mark.parametrize("restore", [True, False])
def test_adabn_validates_with_target_statistics(tmp_path, restore):
    target = data(32, shift=3.0, scale=2.0, seed=2)
    plain, adapted = seeded(), seeded()
    fit(plain, tmp_path=tmp_path, val=data(16))
    probe = _StatsDuringValidation()
    fit(adapted, [AdaBN(target, restore=restore), probe], tmp_path=tmp_path, val=data(16))
    expected = copy.deepcopy(plain.net)
    normkit.tools.adapt(expected, target)
    assert len(probe.seen) == 1 and torch.allclose(probe.seen[0], expected[1].running_mean, atol=1e-5)
    final = adapted.net[1].running_mean
    if restore:
        assert all(torch.equal(v, adapted.state_dict()[k]) for k, v in plain.state_dict().items())
    else:
        assert torch.allclose(final, expected[1].running_mean, atol=1e-5)


def test_precise_bn_bad_arguments():
    with pytest.raises(ValueError, match="num_batches to be a positive int or None"):
        PreciseBN(num_batches=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        PreciseBN(every_n_epochs=0)
    with pytest.raises(ValueError, match="estimator"):
        PreciseBN(estimator="ema")
    with pytest.raises(ValueError, match="AdaBN: expected target_data"):
        AdaBN(None)


# --- FreezeBatchNorm ----------------------------------------------------------------------------------------------


def test_freeze_from_the_start_survives_train_calls(tmp_path):
    model = seeded()
    before, conv = bn_state(model), model.net[0].weight.detach().clone()
    trainer = fit(model, [FreezeBatchNorm()], tmp_path=tmp_path, val=data(16), max_epochs=3)
    layer = model.net[1]
    assert type(layer) is normkit.nn.FrozenBatchNorm2d and layer.training  # model.train() ran; nothing moved
    after = bn_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(conv, model.net[0].weight)  # the rest trained
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()} and len(optimized) == 3  # conv, linear weight + bias


def test_freeze_from_an_epoch_on(tmp_path):
    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.frozen_with = bn_state(pl_module)
                self.layer = type(pl_module.net[1])

    model, probe = seeded(), Probe()
    start = bn_state(model)
    fit(model, [FreezeBatchNorm(epoch=1), probe], tmp_path=tmp_path, val=data(16), max_epochs=3)
    assert probe.layer is normkit.nn.FrozenBatchNorm2d
    assert not torch.equal(probe.frozen_with["net.1.running_mean"], start["net.1.running_mean"])  # epoch 0 trained
    after = bn_state(model)
    assert all(torch.equal(probe.frozen_with[k], after[k]) for k in after)


def test_freeze_submodules_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no submodule 'backbone'"):
        fit(seeded(), [FreezeBatchNorm(submodules="backbone")], tmp_path=tmp_path)
    with pytest.raises(ValueError, match="non-negative int"):
        FreezeBatchNorm(epoch=-1)


# --- several ranks: PreciseBN and AdaBN pool the statistics -------------------------------------------------------


def _pool_worker(rank: int, world: int, port: int, folder: str) -> None:
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    from normkit.integrations.lightning import _all_reduce_statistics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    try:
        model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm2d(2))
        with torch.no_grad():
            model[0].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1))
            model[0].running_var.copy_(torch.tensor([1.0, 0.5, 2.0]) + rank)
            model[2].running_mean.fill_(-rank)
            model[2].running_var.fill_(4.0 * (rank + 1))
        count = _all_reduce_statistics(model)
        torch.save({"count": count, "state": model.state_dict()}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_are_pooled_over_ranks(tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_pool_worker, args=(rank, 2, port, str(tmp_path)), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    means = [torch.tensor([1.0, 2.0, 3.0]) * (r + 1) for r in range(2)]
    variances = [torch.tensor([1.0, 0.5, 2.0]) + r for r in range(2)]
    mean = (means[0] + means[1]) / 2
    var = ((variances[0] + means[0] ** 2) + (variances[1] + means[1] ** 2)) / 2 - mean ** 2
    for result in results:
        assert result["count"] == 2
        assert torch.allclose(result["state"]["0.running_mean"], mean)
        assert torch.allclose(result["state"]["0.running_var"], var)
        assert torch.allclose(result["state"]["2.running_mean"], torch.full((2,), -0.5))
        assert torch.allclose(result["state"]["2.running_var"], torch.full((2,), 6.0 + 0.25))
