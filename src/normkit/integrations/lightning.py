"""Lightning callbacks for batch norm: the doctor at fit start, the monitor, precise BN and AdaBN, freezing.

Each callback runs one normkit function at the right moment of ``trainer.fit``:

- :class:`BatchNormDoctor`: :func:`normkit.doctor` before the first training step; raises
  :class:`BatchNormDoctorError` on errors, logs the rest.
- :class:`BatchNormMonitor`: :class:`normkit.Monitor` every ``every_n_steps`` training steps, to the trainer's loggers.
- :class:`PreciseBN`: :func:`normkit.tools.recalibrate` before validation, every ``every_n_epochs`` epochs.
- :class:`AdaBN`: :func:`normkit.tools.adapt` before each validation (target statistics), restored afterwards.
- :class:`FreezeBatchNorm`: :func:`normkit.tools.freeze` before the optimizers are built, or from an epoch on.

Install with ``pip install 'normkit[lightning]'``; ``import normkit`` does not import Lightning, this module does.
Messages go to the Python logger ``normkit.integrations.lightning`` (rank 0 only); metrics to ``trainer.loggers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.seed import isolate_rng
except ImportError as _error:  # pragma: no cover - exercised only where lightning is missing
    raise ImportError(
        f"normkit.integrations.lightning: expected the lightning package (>= 2.4), which is not installed "
        f"({_error}). Install it with `pip install 'normkit[lightning]'` (or `pip install lightning`)."
    ) from _error

from ..diagnostics import Report, doctor
from ..diagnostics._monitor import FIELDS, Monitor
from ..tools.freeze import freeze
from ..tools.recalibrate import ESTIMATORS, recalibrate

log = logging.getLogger(__name__)

#: The Monitor fields :class:`BatchNormMonitor` can log (the per-step statistics, not the bookkeeping columns).
MONITOR_FIELDS: tuple[str, ...] = FIELDS[5:]
FIRST_BATCH = "first_batch"
_FAIL_ON = ("error", "warning", None)
_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}


class BatchNormDoctorError(ValueError):
    """Raised by :class:`BatchNormDoctor` when the doctor finds what ``fail_on`` names; ``.report`` has it all."""

    def __init__(self, report: Report, fail_on: str) -> None:
        self.report = report
        worst = "error(s)" if fail_on == "error" else "error(s) or warning(s)"
        super().__init__(
            f"normkit's BatchNormDoctor stopped trainer.fit before the first training step: the doctor found "
            f"{worst} (fail_on={fail_on!r}). Fix the model as each finding says, or pass fail_on=None to only log "
            f"them.\n{report}"
        )


class BatchNormDoctor(Callback):
    """Run :func:`normkit.doctor` on the model before training starts, and stop ``trainer.fit`` on what it finds.

    With the default ``example_input="first_batch"`` the check runs in ``on_train_start`` (after Lightning's
    sanity validation, before the first training step) on the first batch of the training dataloader, moved to
    the device by the strategy (the LightningModule's batch-transfer hooks included), so the dynamic rules see the
    real per-device batch size. The batch is drawn with every random number generator isolated
    (``lightning.pytorch.utilities.seed.isolate_rng``): the training's data order does not change. With an
    explicit ``example_input`` or ``input_shape`` (or ``example_input=None``: the module-tree rules only) it runs
    in ``on_fit_start``, before the sanity validation. The doctor checks a copy; the model is not changed.

    Every rank runs the check, so every rank raises together under data parallelism; findings are logged on rank
    0: to the Python logger ``normkit.integrations.lightning`` (errors at ERROR, warnings at WARNING, infos at
    INFO) and their counts as metrics ``normkit/doctor_errors``, ``normkit/doctor_warnings``,
    ``normkit/doctor_infos`` to each of ``trainer.loggers``. The report stays in :attr:`report`.

    Args:
        example_input: ``"first_batch"`` (default), ``None`` (no forward pass), or the model's input: a tensor, a
            tuple/list of positional arguments or a dict of keyword arguments, on the model's device.
        input_shape: instead of ``example_input``: a shape whose first entry is the per-device batch size; a
            standard normal tensor of it is created on the module's device.
        mode: ``"train"`` (default) or ``"inference"``, as in :func:`normkit.doctor`.
        fail_on: ``"error"`` (default): raise :class:`BatchNormDoctorError` when an error is found;
            ``"warning"``: also on warnings; ``None``: never raise, only log.
        submodule: the dotted name of the network to check (e.g. ``"net"``) when the LightningModule has no
            ``forward``; default ``None``: the LightningModule itself.
        input_from_batch: a function from a training batch to the model's input, for batches that are not a
            tensor or a tuple/list whose first element is the input (e.g. ``lambda batch: batch["image"]``).
        world_size: the number of data-parallel replicas for the ``sync-bn-missing`` rule. Default: the trainer's.

    Examples::

        >>> from normkit.integrations.lightning import BatchNormDoctor
        >>> BatchNormDoctor(fail_on="warning").fail_on
        'warning'
    """

    def __init__(self, example_input=FIRST_BATCH, *, input_shape: Iterable[int] | None = None, mode: str = "train",
                 fail_on: str | None = "error", submodule: str | None = None,
                 input_from_batch: Callable | None = None, world_size: int | None = None) -> None:
        if fail_on not in _FAIL_ON:
            raise ValueError(f"BatchNormDoctor: expected fail_on 'error', 'warning' or None, got {fail_on!r}.")
        if mode not in ("train", "inference"):
            raise ValueError(f"BatchNormDoctor: expected mode 'train' or 'inference', got {mode!r}.")
        if input_shape is not None:
            if not (isinstance(example_input, str) and example_input == FIRST_BATCH):
                raise ValueError("BatchNormDoctor: pass example_input or input_shape, not both; got both.")
            input_shape = tuple(input_shape)
            if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                          for d in input_shape):
                raise ValueError(f"BatchNormDoctor: expected input_shape to be positive ints such as (32, 3, 32, 32) "
                                 f"(the batch first), got {input_shape!r}.")
        elif isinstance(example_input, str) and example_input != FIRST_BATCH:
            raise ValueError(f"BatchNormDoctor: expected example_input {FIRST_BATCH!r}, None, a tensor, a tuple/list "
                             f"or a dict of the model's inputs, got the string {example_input!r}.")
        _check_callable(input_from_batch, "input_from_batch", "BatchNormDoctor")
        self.example_input = example_input
        self.input_shape = input_shape
        self.mode = mode
        self.fail_on = fail_on
        self.submodule = submodule
        self.input_from_batch = input_from_batch
        self.world_size = world_size
        self.report: Report | None = None

    @property
    def _from_first_batch(self) -> bool:
        return self.input_shape is None and isinstance(self.example_input, str)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = None
        network = _network(pl_module, self.submodule, "BatchNormDoctor",
                           needs_forward=self._from_first_batch or self.example_input is not None)
        if self._from_first_batch:
            return  # on_train_start, with the first training batch
        example = self.example_input
        if self.input_shape is not None:
            with isolate_rng():
                example = torch.randn(self.input_shape, device=pl_module.device)
        self._check(trainer, network, example)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._from_first_batch:
            return
        network = _network(pl_module, self.submodule, "BatchNormDoctor")
        loader = _single_train_loader(trainer, "BatchNormDoctor", "example_input=")
        with isolate_rng():
            batch = next(iter(loader), None)
        if batch is None:
            raise ValueError("BatchNormDoctor: the training dataloader gave no batch; expected at least one. Give it "
                             "data, or pass example_input= (or None for the module-tree checks only).")
        batch = trainer.strategy.batch_to_device(batch)
        self._check(trainer, network, _model_input(batch, self.input_from_batch, "BatchNormDoctor"))

    def _check(self, trainer: pl.Trainer, network: nn.Module, example) -> None:
        world_size = self.world_size if self.world_size is not None else trainer.world_size
        report = doctor(network, example, mode=self.mode, world_size=world_size)
        self.report = report
        if trainer.is_global_zero:
            for finding in report.findings:
                log.log(_LEVELS[finding.severity], "normkit doctor: %s %s [%s] %s Fix: %s", finding.severity,
                        finding.rule, finding.module or "(root)", finding.message, finding.fix)
            counts = report.to_dict()["counts"]
            metrics = {f"normkit/doctor_{severity}s": float(count) for severity, count in counts.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        failing = report.errors if self.fail_on == "error" else (
            report.errors + report.warnings if self.fail_on == "warning" else [])
        if failing:
            raise BatchNormDoctorError(report, self.fail_on)


class BatchNormMonitor(Callback):
    """Log what every batch norm's statistics do to the trainer's loggers, every ``every_n_steps`` training steps.

    A :class:`normkit.Monitor` watches the batch norms during the training forward of the steps whose
    ``trainer.global_step`` is a multiple of ``every_n_steps`` (its hooks are installed for that batch only, so the
    other steps and validation cost nothing). For each batch norm and field it logs ``{prefix}/{layer}/{field}``
    (``/call{k}`` added for the ``k``-th extra call of a batch norm used several times per forward) with
    ``logger.log_metrics(metrics, step=global_step)`` to every logger in ``trainer.loggers``, on rank 0 (whose
    batch it describes). With gradient accumulation the first micro-batch of a step is recorded. The records
    (their ``step`` is the global step) stay in :attr:`monitor` for ``monitor.plot(path)`` or ``monitor.to_csv``.

    Args:
        every_n_steps: record every ``every_n_steps``-th optimizer step, step 0 included. Default: ``50``
        fields: which Monitor fields to log, from :data:`MONITOR_FIELDS`. Default: ``("distance", "var_ratio",
            "mean_shift", "dead_fraction")`` (see :class:`normkit.Monitor` for their definitions).
        prefix: the metric-name prefix. Default: ``"bn"``
        dead_var: as in :class:`normkit.Monitor` (default: each layer's eps).
        submodule: the dotted name of the part of the LightningModule to watch; default: all of it.

    Examples::

        >>> from normkit.integrations.lightning import BatchNormMonitor
        >>> BatchNormMonitor(every_n_steps=10, fields=("distance",)).fields
        ('distance',)
    """

    def __init__(self, every_n_steps: int = 50, *,
                 fields: Iterable[str] = ("distance", "var_ratio", "mean_shift", "dead_fraction"), prefix: str = "bn",
                 dead_var: float | None = None, submodule: str | None = None) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"BatchNormMonitor: expected every_n_steps to be a positive int, got {every_n_steps!r}.")
        fields = (fields,) if isinstance(fields, str) else tuple(fields)
        unknown = [f for f in fields if f not in MONITOR_FIELDS]
        if unknown or not fields:
            raise ValueError(f"BatchNormMonitor: expected fields from {MONITOR_FIELDS}, got {fields!r}.")
        self.every_n_steps = every_n_steps
        self.fields = fields
        self.prefix = prefix
        self.dead_var = dead_var
        self.submodule = submodule
        self.monitor: Monitor | None = None
        self._recording: int | None = None
        self._last_recorded: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = _network(pl_module, self.submodule, "BatchNormMonitor", needs_forward=False)
        self.monitor = Monitor(network, every=1, auto_step=False, dead_var=self.dead_var)
        self._recording = self._last_recorded = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if (self.monitor is None or not trainer.is_global_zero or step % self.every_n_steps
                or step == self._last_recorded):
            return
        self._recording = self._last_recorded = step
        self.monitor.attach()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._recording is None:
            return
        step, self._recording = self._recording, None
        start = len(self.monitor.records)
        self.monitor.step()  # moves this batch's statistics to records
        self.monitor.detach()
        metrics = {}
        for record in self.monitor.records[start:]:
            record["step"] = step
            name = record["layer"] or "(root)"
            suffix = f"/call{record['call']}" if record["call"] else ""
            metrics.update({f"{self.prefix}/{name}/{field}{suffix}": record[field] for field in self.fields})
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


class PreciseBN(Callback):
    r"""Precise batch norm before validation: the running statistics replaced by exact ones over training batches.

    Before validation (not the sanity check) in every ``every_n_epochs``-th epoch, and at that epoch's end if it
    had no validation, :func:`normkit.tools.recalibrate` computes each batch norm's population statistics over
    at most ``num_batches`` batches of ``data`` (default: the training dataloader) with the current weights: the
    model runs under ``torch.no_grad()`` with its batch norms normalizing by batch statistics, as in training,
    and every other module in eval mode, as at inference (dropout off). Batches go through the strategy's
    ``batch_to_device`` (the LightningModule's transfer hooks included), and every random number generator is
    isolated, so the training's data order and randomness are the same as without the callback; only the running
    statistics (and ``num_batches_tracked``) change. Training then goes on from the new statistics (fvcore's and
    detectron2's ``PreciseBN`` hook). Under ``torch.distributed`` each rank computes the statistics of its own
    batches, then every rank takes the pooled ones (:math:`\mu = \overline{\mu_r}`, :math:`\sigma^2 =
    \overline{\sigma^2_r + \mu_r^2} - \mu^2`, ranks weighted equally).

    Args:
        data: an iterable of batches (a DataLoader); default ``None``: the trainer's training dataloader.
        num_batches: use at most this many batches. Default: ``200`` (fvcore's)
        every_n_epochs: recalibrate in every ``every_n_epochs``-th epoch. Default: ``1``
        estimator: ``"population"`` (default) or ``"mean_of_batches"``, as in :func:`normkit.tools.recalibrate`.
        submodule: the dotted name of the network to run (when the LightningModule has no ``forward``).
        input_from_batch: a function from a batch to the model's input; default: the batch if it is a tensor,
            else its first element.

    Examples::

        >>> from normkit.integrations.lightning import PreciseBN
        >>> PreciseBN(num_batches=100, every_n_epochs=5).num_batches
        100
    """

    _caller = "PreciseBN"

    def __init__(self, data: Iterable | None = None, *, num_batches: int | None = 200, every_n_epochs: int = 1,
                 estimator: str = "population", submodule: str | None = None,
                 input_from_batch: Callable | None = None) -> None:
        caller = self._caller
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"{caller}: expected num_batches to be a positive int or None (all), got {num_batches!r}.")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"{caller}: expected every_n_epochs to be a positive int, got {every_n_epochs!r}.")
        if estimator not in ESTIMATORS:
            raise ValueError(f"{caller}: expected estimator in {ESTIMATORS}, got {estimator!r}.")
        _check_callable(input_from_batch, "input_from_batch", caller)
        self.data = data
        self.num_batches = num_batches
        self.every_n_epochs = every_n_epochs
        self.estimator = estimator
        self.submodule = submodule
        self.input_from_batch = input_from_batch
        self.last_step: int | None = None  # the global step of the last recalibration

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _network(pl_module, self.submodule, self._caller)  # fail now, not after the first epoch
        self.last_step = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._maybe_recalibrate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_recalibrate(trainer, pl_module)

    def _maybe_recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or self.last_step == trainer.global_step:
            return
        self.last_step = trainer.global_step
        self._update(trainer, pl_module, self.data, self.num_batches)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data, num_batches: int | None) -> None:
        network = _network(pl_module, self.submodule, self._caller)
        if data is None:
            data = _single_train_loader(trainer, self._caller, "data=")
        modes = [(m, m.training) for m in network.modules()]
        seen = [0]
        try:
            network.eval()
            with isolate_rng():
                batches = _inputs(trainer, data, num_batches, self.input_from_batch, self._caller, seen)
                recalibrate(network, batches, estimator=self.estimator, progress=False)
        finally:
            for module, training in modes:
                module.training = training
        layers = _all_reduce_statistics(network)
        if trainer.is_global_zero:
            log.info("normkit %s: new running statistics for %d batch norm(s) from %d batch(es) at step %d",
                     self._caller, layers, seen[0], trainer.global_step)


class AdaBN(PreciseBN):
    """AdaBN before each validation: the batch norms take the statistics of the target domain, then get theirs back.

    Before each validation (not the sanity check) :func:`normkit.tools.adapt` replaces every batch norm's running
    statistics by those of ``target_data`` (Li et al. 2016; the same pass as :class:`PreciseBN`: batch norms on
    batch statistics, other modules in eval mode, random number generators isolated, ranks pooled), so the
    validation measures the model as it would be deployed on the target domain with AdaBN. With ``restore=True``
    (the default) the source statistics and ``num_batches_tracked`` come back at the end of validation, before
    ``ModelCheckpoint`` saves (Lightning runs checkpoint callbacks last), so training and checkpoints keep the
    source domain's statistics; with ``restore=False`` the target statistics stay (and training's running
    averages move on from them).

    Args:
        target_data: an iterable of target-domain batches (labels, if any, are ignored).
        num_batches: use at most this many batches. Default: ``None`` (all of ``target_data``)
        restore: put the source statistics back after validation. Default: ``True``
        estimator, submodule, input_from_batch: as in :class:`PreciseBN`.

    Examples::

        >>> import torch
        >>> from normkit.integrations.lightning import AdaBN
        >>> AdaBN(torch.randn(64, 3).split(16)).restore
        True
    """

    _caller = "AdaBN"

    def __init__(self, target_data: Iterable, *, num_batches: int | None = None, restore: bool = True,
                 estimator: str = "population", submodule: str | None = None,
                 input_from_batch: Callable | None = None) -> None:
        if target_data is None:
            raise ValueError("AdaBN: expected target_data, an iterable of target-domain batches (a DataLoader), got "
                             "None. For the training data's own statistics use PreciseBN.")
        super().__init__(target_data, num_batches=num_batches, estimator=estimator, submodule=submodule,
                         input_from_batch=input_from_batch)
        self.restore = restore
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        network = _network(pl_module, self.submodule, self._caller)
        if self.restore:
            self._saved = [(buffer, buffer.detach().clone()) for m in network.modules() if isinstance(m, _BatchNorm)
                           for buffer in (m.running_mean, m.running_var, m.num_batches_tracked) if buffer is not None]
        self.last_step = trainer.global_step
        self._update(trainer, pl_module, self.data, self.num_batches)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved is not None:
            with torch.no_grad():
                for buffer, value in self._saved:
                    buffer.copy_(value)
            self._saved = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return  # the target statistics are for validation only


class FreezeBatchNorm(Callback):
    """Freeze the batch norms for fine-tuning: from the start (before the optimizers exist) or from an epoch on.

    :func:`normkit.tools.freeze` replaces each batch norm by a ``normkit.nn.FrozenBatchNorm1d/2d/3d`` (buffers
    only, the ``eval()`` output), so neither the optimizer nor Lightning's ``model.train()`` after each validation
    can change it: no training mode brings the batch statistics back (unlike ``bn.eval()`` plus
    ``requires_grad_(False)``, which the next ``model.train()`` undoes). The state_dict keys stay those of the batch
    norms, so checkpoints load both ways.

    With ``epoch=0`` (the default) the freeze happens in ``setup("fit")``, before ``configure_optimizers``, so the
    optimizer never holds the batch norms' parameters; with ``epoch=k`` it happens at the start of epoch ``k``
    (also when a resumed run starts at or after ``k``): the optimizer keeps the old parameters, which get no more
    gradients. Under DDP a later freeze leaves those parameters unused: use ``epoch=0``, or
    ``DDPStrategy(find_unused_parameters=True)``.

    Args:
        epoch: the first epoch trained with frozen batch norms. Default: ``0``
        submodules: dotted names under which to freeze (e.g. ``["backbone"]``); default ``None``: everywhere.

    Examples::

        >>> from normkit.integrations.lightning import FreezeBatchNorm
        >>> FreezeBatchNorm(epoch=2, submodules=["backbone"]).epoch
        2
    """

    def __init__(self, epoch: int = 0, *, submodules: Iterable[str] | str | None = None) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"FreezeBatchNorm: expected epoch to be a non-negative int, got {epoch!r}.")
        self.epoch = epoch
        self.submodules = [submodules] if isinstance(submodules, str) else (
            None if submodules is None else list(submodules))
        self.frozen = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.frozen = False
        if self.epoch == 0:
            self._freeze(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.frozen and trainer.current_epoch >= self.epoch:
            self._freeze(trainer, pl_module)

    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = sum(isinstance(m, _BatchNorm) for m in pl_module.modules())
        freeze(pl_module, self.submodules)
        self.frozen = True
        if trainer.is_global_zero:
            after = sum(isinstance(m, _BatchNorm) for m in pl_module.modules())
            log.info("normkit FreezeBatchNorm: froze %d batch norm(s) at epoch %d", before - after,
                     trainer.current_epoch)


# -------------------------------------------------------------------------------------------------------------------


def _check_callable(value, name: str, caller: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{caller}: expected {name} to be a function of a batch (or None), got "
                        f"{type(value).__name__}. Pass e.g. {name}=lambda batch: batch['image'].")


def _network(pl_module: pl.LightningModule, submodule: str | None, caller: str, *,
             needs_forward: bool = True) -> nn.Module:
    """The module a callback runs: ``pl_module`` itself, or its ``submodule``; the LightningModule must have a
    ``forward`` when it is to be run."""
    if submodule is not None:
        try:
            return pl_module.get_submodule(submodule)
        except AttributeError:
            known = ", ".join(repr(n) for n, _ in list(pl_module.named_children())[:5]) or "(none)"
            raise ValueError(f"{caller}: {type(pl_module).__name__} has no submodule {submodule!r}; expected a dotted "
                             f"name from named_modules(), such as {known}.") from None
    if needs_forward and type(pl_module).forward is pl.LightningModule.forward:
        children = [n for n, _ in pl_module.named_children()]
        example = repr(children[0]) if children else "'net'"
        raise TypeError(f"{caller}: {type(pl_module).__name__} defines no forward(), so it cannot be run on an input. "
                        f"Pass submodule={example} (the network training_step calls), or define forward().")
    return pl_module


def _single_train_loader(trainer: pl.Trainer, caller: str, option: str):
    loader = trainer.train_dataloader
    if loader is None or isinstance(loader, (list, tuple, dict)):
        got = "no training dataloader" if loader is None else f"{len(loader)} training dataloaders"
        raise ValueError(f"{caller}: expected one training dataloader to take batches from, got {got}. Pass "
                         f"{option} explicitly.")
    return loader


def _model_input(batch, input_from_batch: Callable | None, caller: str):
    if input_from_batch is not None:
        return input_from_batch(batch)
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"{caller}: a batch is a {type(batch).__name__}; expected a tensor or a tuple/list whose first "
                    "element is the model's input. Pass input_from_batch=lambda batch: batch['image'] (whatever "
                    "training_step feeds the model).")


def _inputs(trainer: pl.Trainer, data: Iterable, num_batches: int | None, input_from_batch: Callable | None,
            caller: str, seen: list[int]) -> Iterator[torch.Tensor]:
    """The model's inputs from at most ``num_batches`` batches of ``data``, on the strategy's device."""
    if isinstance(data, torch.Tensor):
        data = [data]
    for batch in islice(data, num_batches):
        seen[0] += 1
        yield _model_input(trainer.strategy.batch_to_device(batch), input_from_batch, caller)


def _all_reduce_statistics(network: nn.Module) -> int:
    """Pool the running statistics of every batch norm over the ranks (equal weights); returns the layer count."""
    layers = [m for m in network.modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None]
    import torch.distributed as dist

    if not layers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return len(layers)
    with torch.no_grad():
        means = [m.running_mean.to(torch.float64) for m in layers]
        moments = torch.cat([torch.cat(means), torch.cat([m.running_var.to(torch.float64) + mean.square()
                                                          for m, mean in zip(layers, means, strict=True)])])
        dist.all_reduce(moments)
        moments /= dist.get_world_size()
        pooled_means, second = moments.chunk(2)
        offset = 0
        for m in layers:
            n = m.running_mean.numel()
            mean = pooled_means[offset:offset + n]
            m.running_mean.copy_(mean)
            m.running_var.copy_(second[offset:offset + n] - mean.square())
            offset += n
    return len(layers)


__all__ = [
    "FIRST_BATCH",
    "MONITOR_FIELDS",
    "AdaBN",
    "BatchNormDoctor",
    "BatchNormDoctorError",
    "BatchNormMonitor",
    "FreezeBatchNorm",
    "PreciseBN",
]
