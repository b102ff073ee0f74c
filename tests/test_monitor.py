"""normkit.diagnostics.Monitor: records, detects a distribution shift, writes CSV/JSON/PNG, leaves no hooks."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from torch import nn

import normkit
from normkit.diagnostics import Monitor
from normkit.diagnostics._monitor import FIELDS


def small_cnn(bn=nn.BatchNorm2d, seed=0):
    with torch.random.fork_rng(devices=[]):  # the rules' thresholds assume this initialisation, whatever ran before
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), bn(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1, bias=False), bn(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def train(model, steps, shift_at=None, every=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, every=every) as monitor:
        for step in range(steps):
            x = torch.randn(32, 1, 6, 6, generator=generator)
            if shift_at is not None and step >= shift_at:
                x = x * 4.0 + 2.0  # the injected shift
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    return monitor


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, normkit.BatchNorm2d])
def test_records_every_nth_step_per_bn(bn):
    model = small_cnn(bn)
    monitor = train(model, steps=10, every=3)
    assert monitor.layers == ["1", "4"]
    assert [(r["step"], r["layer"]) for r in monitor.records] == [(s, n) for s in (0, 3, 6, 9) for n in ("1", "4")]
    for record in monitor.records:
        assert set(record) == set(FIELDS)
        assert record["training"] is True and record["batch_size"] == 32 and record["call"] == 0
        assert 0.0 <= record["dead_fraction"] <= 1.0
    assert monitor.current_step == 10
    assert not model[1]._forward_pre_hooks and not model._forward_hooks  # hooks removed on exit


def test_detects_an_injected_shift_running_stats_lag_batch_stats():
    model = small_cnn()
    monitor = train(model, steps=40, shift_at=20)
    steps, distance = monitor.series("1", "distance")
    _, batch_var = monitor.series("1", "batch_var")
    _, running_var = monitor.series("1", "running_var")
    _, shift = monitor.series("1", "mean_shift")
    before, at = distance[steps.index(19)], distance[steps.index(20)]
    assert before < 0.1 and at > 10 * before  # the shift shows as a jump of the distance
    assert batch_var[20] > 4 * running_var[20]  # the running variance lags the batch's
    assert shift[20] > 1.0
    assert distance[-1] < at / 3  # and catches up (momentum 0.1)
    assert running_var[-1] > running_var[20]


def test_first_layer_statistics_match_a_direct_computation():
    model = small_cnn().eval()
    x = torch.randn(16, 1, 6, 6)
    with Monitor(model) as monitor:
        model(x)
    record = monitor.records[0]
    features = model[0](x)
    var, mean = torch.var_mean(features, dim=(0, 2, 3), unbiased=False)
    assert record["training"] is False
    assert record["batch_mean"] == pytest.approx(mean.mean().item(), rel=1e-5, abs=1e-7)
    assert record["batch_var"] == pytest.approx(var.mean().item(), rel=1e-5)
    assert record["running_var"] == 1.0 and record["gamma_mean"] == 1.0 and record["beta_std"] == 0.0
    kl = 0.5 * ((var + 1e-5) / (1 + 1e-5) + mean.square() / (1 + 1e-5) - 1 - torch.log((var + 1e-5) / (1 + 1e-5)))
    assert record["distance"] == pytest.approx(kl.mean().item(), rel=1e-4)


def test_dead_channels_and_recurrence_and_manual_steps():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn)
    x = torch.randn(8, 4)
    x[:, 1] = 3.0  # a constant channel
    with Monitor(model, auto_step=False) as monitor:
        model(x)
        model(x)  # two calls in one step, as in a recurrent loop
        monitor.step()
        model(x)
    assert [(r["step"], r["call"]) for r in monitor.records] == [(0, 0), (0, 1), (1, 0)]
    assert monitor.records[0]["dead_fraction"] == 0.25


def test_writes_csv_json_and_a_png(tmp_path):
    monitor = train(small_cnn(), steps=30, shift_at=15, every=2)
    with monitor.to_csv(tmp_path / "m.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(monitor.records) == 30 and list(rows[0]) == list(FIELDS)
    data = json.loads(monitor.to_json(tmp_path / "m.json").read_text())
    assert data["schema"] == "normkit.monitor/1" and data["every"] == 2 and data["fields"] == list(FIELDS)
    assert data["records"][0]["step"] == 0
    png = monitor.plot(tmp_path / "sub" / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="expected focus to be a recorded BN"):
        monitor.plot(tmp_path / "x.png", focus="nope")


def test_tensorboard_absence_is_a_clear_error(tmp_path, monkeypatch):
    monitor = train(small_cnn(), steps=2)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed, even where it is
    with pytest.raises(ImportError, match="pip install tensorboard"):
        monitor.to_tensorboard(tmp_path)


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="positive int, got 0"):
        Monitor(small_cnn(), every=0)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        Monitor("model")
    with pytest.raises(ValueError, match="expected recorded steps"):
        Monitor(small_cnn()).plot(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="expected a field in"):
        Monitor(small_cnn()).series("1", "nope")


# ----------------------------------------------------------------------------------------- train and eval calls


def train_with_validation(model, steps=6, validate_at=(2, 4)):
    """Training forwards, with an eval-mode (validation) forward of shifted data as its own step at ``validate_at``."""
    generator = torch.Generator().manual_seed(0)
    with Monitor(model) as monitor:
        for step in range(steps):
            x = torch.randn(16, 1, 6, 6, generator=generator)
            if step in validate_at:
                model.eval()
                with torch.no_grad():
                    model(x * 4.0 + 2.0)  # far from the running statistics: a spike if joined into the line
                model.train()
            else:
                model(x)
    return monitor


def test_eval_calls_are_recorded_as_eval_and_kept_out_of_the_training_series():
    monitor = train_with_validation(small_cnn())
    modes = {(r["step"], r["layer"]): r["training"] for r in monitor.records}
    assert modes == {(s, n): s not in (2, 4) for s in range(6) for n in ("1", "4")}
    train_steps, train_distance = monitor.series("1", "distance", mode="train")
    eval_steps, eval_distance = monitor.series("1", "distance", mode="eval")
    assert train_steps == [0, 1, 3, 5] and eval_steps == [2, 4]
    assert min(eval_distance) > 5 * max(train_distance[1:])  # the shifted validation batches stand out
    all_steps, all_distance = monitor.series("1", "distance")  # the default keeps every call, as before
    assert all_steps == list(range(6))
    assert [all_distance[s] for s in eval_steps] == eval_distance
    assert monitor.series("1", "training", mode="eval") == ([2, 4], [False, False])
    with pytest.raises(ValueError, match=r"expected mode to be one of \('all', 'train', 'eval'\), got 'val'"):
        monitor.series("1", "distance", mode="val")


def test_a_train_and_an_eval_call_in_one_manual_step_are_told_apart():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with Monitor(model, auto_step=False) as monitor:
        model(torch.randn(8, 3))
        model.eval()
        model(torch.randn(8, 3))
        monitor.step()
    assert [(r["call"], r["training"]) for r in monitor.records] == [(0, True), (1, False)]
    assert monitor.series("1", "batch_size", call=1, mode="eval") == ([0], [8])
    assert monitor.series("1", "batch_size", call=1, mode="train") == ([], [])


def _eval_markers(ax):
    return [line for line in ax.get_lines() if line.get_marker() == "x" and line.get_linestyle() == "None"
            and len(line.get_xdata())]


def test_the_figure_draws_eval_calls_as_separate_markers_with_a_legend_entry():
    monitor = train_with_validation(small_cnn())
    figure = monitor.figure(focus="1")
    distance, mean, var, dead = figure.axes
    for ax in (distance, mean, var):
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert solid and all(list(line.get_xdata()) == [0, 1, 3, 5] for line in solid)  # no eval step joined
        markers = _eval_markers(ax)
        assert markers and all(list(line.get_xdata()) == [2, 4] for line in markers)
    assert len(_eval_markers(distance)) == 2  # one per layer, in the layer's colour
    colours = {line.get_label(): line.get_color() for line in distance.get_lines()}
    assert {line.get_color() for line in _eval_markers(distance)} == {colours["1"], colours["4"]}
    assert any("eval-mode call" in text.get_text() for text in distance.get_legend().get_texts())
    assert any("eval-mode call" in text.get_text() for text in mean.get_legend().get_texts())
    assert "eval-mode calls" in figure._suptitle.get_text()
    steps, eval_distance = monitor.series("1", "distance", mode="eval")
    marker = next(line for line in _eval_markers(distance) if line.get_color() == colours["1"])
    assert list(marker.get_ydata()) == pytest.approx(eval_distance)


def test_training_only_figure_has_no_eval_entry():
    monitor = train(small_cnn(), steps=4)
    distance = monitor.figure().axes[0]
    assert not _eval_markers(distance)
    assert not any("eval" in text.get_text() for text in distance.get_legend().get_texts())


@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_the_step_axes_have_integer_ticks(steps):
    figure = train(small_cnn(), steps=steps).figure()  # matplotlib's default puts ticks at 0.5 for these ranges
    for ax in figure.axes:
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_matplotlib_is_imported_only_by_plotting():
    import subprocess

    code = ("import sys, torch, normkit; from normkit.diagnostics import Monitor; "
            "m = torch.nn.Sequential(torch.nn.BatchNorm1d(2)); mon = Monitor(m).attach(); m(torch.randn(4, 2)); "
            "mon.series('0', 'distance', mode='train'); print('matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
