"""The GroupNorm/LayerNorm kernels' configs: the heuristic table per shape class, the optional tuning
(``NORMKIT_TUNE=1`` / ``check``) with its on-disk cache (``_tune_cache``), and that nothing is timed by default or
under the interpreter. Timing is mocked: no GPU needed."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from normkit.kernels import _tune_cache, _tuning

gk = importlib.import_module("normkit.kernels._group_norm")
lk = importlib.import_module("normkit.kernels._layer_norm")
CUDA = torch.device("cuda", 0)  # only its type and index are read: nothing runs on it


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test: an empty cache folder of its own, no tuning unless it sets NORMKIT_TUNE, nothing remembered."""
    monkeypatch.setenv(_tune_cache.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(_tuning.TUNE_ENV, raising=False)
    _tune_cache.clear_memory()
    yield
    _tune_cache.clear_memory()


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """Tuning as on a GPU: interpreter check off, the cache file in tmp_path, ``measure`` mocked (8 warps is the
    fastest); returns the list of configs timed."""
    calls = []

    def fake_measure(run, config):
        calls.append(config)
        return abs(config["num_warps"] - 8) + 1.0

    monkeypatch.setattr(_tuning, "interpreting", lambda: False)
    monkeypatch.setattr(_tuning, "_device_cache_path", lambda index: tmp_path / "tuning-test-gpu.json")
    monkeypatch.setattr(_tuning, "measure", fake_measure)
    return calls


def _warps(family, values):
    return _tuning.table_config(family, values)["num_warps"]


GPU_LN = dict(limits=lk.GPU_LIMITS)
GPU_GN = gk.GPU_LIMITS


@pytest.mark.parametrize("d, fwd, bwd", [(64, 4, 4), (768, 8, 16), (1024, 8, 16), (2048, 8, 16), (4096, 8, 16),
                                         (8192, 16, 32), (12288, 16, 16), (16384, 16, 16), (32768, 16, 16)])
def test_layer_norm_table_per_shape_class(d, fwd, bwd):
    p, pb = lk.plan(d, **GPU_LN), lk.plan(d, backward=True, **GPU_LN)
    assert (_warps("ln_fwd", p.rows * p.block_d), _warps("ln_bwd", pb.rows * pb.block_d)) == (fwd, bwd)
    assert pb.block_d <= 8192  # the backward holds at most 8192 values a row (above: 4096-value tiles)


@pytest.mark.parametrize("d", [8192, 12288, 16384])
def test_long_layer_norm_rows_never_get_one_or_two_warps(d):
    """Few warps at 8-16k columns spill and take 10-70 s to compile: neither the table nor tuning tries them."""
    for family, backward in (("ln_fwd", False), ("ln_bwd", True)):
        p = lk.plan(d, backward=backward, **GPU_LN)
        assert all(c["num_warps"] >= 8 for c in _tuning.candidates(family, p.rows * p.block_d))


@pytest.mark.parametrize("shape, channels_last, fwd, bwd", [
    ((8, 32, 10, 4096), False, 4, 8),   # GN(32) on 64x64 planes: 2048-value tiles
    ((8, 1, 2048, 49), False, 4, 4),    # GN(1, 2048) at 7x7, split: tiles shrunk to 1024 values
    ((8, 32, 10, 4096), True, 4, 8),    # channels_last
    ((2, 4, 3, 5), False, 1, 1),        # tiny groups: one warp
])
def test_group_norm_table_per_shape_class(shape, channels_last, fwd, bwd):
    n, groups, k, s = shape
    p = gk.plan(n, groups, k, s, channels_last, programs=8 * 132, **GPU_GN)
    assert (_warps("gn_fwd", p.tile), _warps("gn_bwd", p.tile)) == (fwd, bwd)


def test_candidates_start_with_the_table_and_respect_the_register_budget():
    for family in _tuning.WARPS_TABLE:
        for values in (16, 256, 1000, 2048, 8192, 16384, 65536):
            found = _tuning.candidates(family, values)
            assert found[0] == _tuning.table_config(family, values)
            assert 1 <= len(found) <= 3 and len({c["num_warps"] for c in found}) == len(found)
            budget = 32 * _tuning.VALUES_PER_THREAD[family]
            fewer = [c["num_warps"] for c in found if c["num_warps"] < found[0]["num_warps"]]
            assert all(w * budget >= values for w in fewer)  # fewer warps only within the register budget


@pytest.mark.parametrize("value, mode", [("1", "full"), ("check", "check"), ("CHECK", "check"), ("0", None),
                                         ("", None)])
def test_tune_mode(monkeypatch, value, mode):
    monkeypatch.setenv(_tuning.TUNE_ENV, value)
    assert _tuning.tune_mode() == mode


def test_unknown_tune_mode_warns_and_uses_the_table(monkeypatch):
    monkeypatch.setenv(_tuning.TUNE_ENV, "yes")
    with pytest.warns(RuntimeWarning, match="NORMKIT_TUNE"):
        assert _tuning.tune_mode() is None


def test_default_times_nothing_and_uses_the_table(timed):
    """Unset NORMKIT_TUNE: the table's config, whatever the cache holds (results reproducible across processes)."""
    _tune_cache.store(_tuning._device_cache_path(0), "ln_fwd|k", {"num_warps": 8})
    assert _tuning.choose("ln_fwd", 8192, lambda: "k", lambda c: None, CUDA) == {"num_warps": 16}
    assert timed == []


def test_interpreter_has_exactly_one_config(monkeypatch):
    monkeypatch.setenv(_tuning.TUNE_ENV, "1")
    monkeypatch.setattr(_tuning, "interpreting", lambda: True)
    monkeypatch.setattr(_tuning, "measure", lambda run, config: pytest.fail("timed under the interpreter"))
    assert _tuning.choose("gn_fwd", 2048, lambda: "k", lambda c: None, CUDA) == _tuning.table_config("gn_fwd", 2048)
    assert _tuning.choose("ln_bwd", 64, lambda: "k", lambda c: None, torch.device("cpu")) == {"num_warps": 1}


def test_full_tuning_times_the_neighbours_once_and_caches_the_winner(monkeypatch, timed, tmp_path):
    monkeypatch.setenv(_tuning.TUNE_ENV, "1")
    assert _tuning.choose("ln_fwd", 8192, lambda: "D=8192", lambda c: None, CUDA) == {"num_warps": 8}
    assert timed == [{"num_warps": 16}, {"num_warps": 32}, {"num_warps": 8}]
    stored = json.loads((tmp_path / "tuning-test-gpu.json").read_text())
    assert stored == {"format": 1, "entries": {"ln_fwd|D=8192": {"num_warps": 8}}}
    _tune_cache.clear_memory()  # another process (or DDP rank): reads the winner, times nothing
    assert _tuning.choose("ln_fwd", 8192, lambda: "D=8192", lambda c: None, CUDA) == {"num_warps": 8}
    assert len(timed) == 3


def test_check_mode_times_at_most_two_candidates(monkeypatch, timed):
    monkeypatch.setenv(_tuning.TUNE_ENV, "check")
    for family, values in (("ln_fwd", 16384), ("ln_bwd", 1024), ("gn_fwd", 2048), ("gn_bwd", 64)):
        timed.clear()
        config = _tuning.choose(family, values, lambda v=values: f"v={v}", lambda c: None, CUDA)
        assert 1 <= len(timed) <= _tuning.CHECK_CANDIDATES == 2
        assert timed[0] == _tuning.table_config(family, values) and config in timed


def test_tuned_runs_each_candidate(monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr(_tuning, "measure", lambda run, config: run(config) or config["num_warps"])
    path = tmp_path / "t.json"
    best = _tuning.tuned(path, "k", [{"num_warps": 8}, {"num_warps": 2}], launched.append)
    assert best == {"num_warps": 2} and launched == [{"num_warps": 8}, {"num_warps": 2}]


def test_a_cached_config_outside_the_candidates_is_retuned(monkeypatch, timed, tmp_path):
    monkeypatch.setenv(_tuning.TUNE_ENV, "1")
    _tune_cache.store(tmp_path / "tuning-test-gpu.json", "ln_fwd|k", {"num_warps": 1})  # a spilling config
    assert _tuning.choose("ln_fwd", 8192, lambda: "k", lambda c: None, CUDA) == {"num_warps": 8}
    assert len(timed) == 3
    _tune_cache.clear_memory()
    assert _tune_cache.lookup(tmp_path / "tuning-test-gpu.json", "ln_fwd|k") == {"num_warps": 8}


def test_cache_round_trip(tmp_path):
    path = _tune_cache.cache_path("3.9.0", "NVIDIA H200 (MIG 1g/18gb)")
    assert path.parent == tmp_path and path.name == "tuning-3.9.0-NVIDIA_H200_MIG_1g_18gb.json"
    assert _tune_cache.lookup(path, "a") is None
    assert _tune_cache.store(path, "a", {"num_warps": 8}) == {"num_warps": 8}
    assert _tune_cache.store(path, "b", {"num_warps": 2, "num_stages": 3}) == {"num_warps": 2, "num_stages": 3}
    _tune_cache.clear_memory()
    assert _tune_cache.lookup(path, "a") == {"num_warps": 8}
    assert _tune_cache.lookup(path, "b") == {"num_warps": 2, "num_stages": 3}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [path.name]  # no temp left


def test_the_first_stored_config_wins(tmp_path):
    """Two processes tuning the same key at once: the second adopts the first's config (all ranks agree)."""
    path = tmp_path / "c.json"
    _tune_cache.store(path, "k", {"num_warps": 8})
    _tune_cache.clear_memory()  # the second process had not seen it
    assert _tune_cache.store(path, "k", {"num_warps": 4}) == {"num_warps": 8}
    assert _tune_cache.lookup(path, "k") == {"num_warps": 8}


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(_tune_cache.CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tune_cache.cache_dir() == tmp_path / ".cache" / "normkit"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format": 99, "entries": {}}',
                                  '{"format": 1, "entries": {"k": 4}}'])
def test_corrupted_cache_is_ignored_with_a_warning(tmp_path, text):
    path = tmp_path / "tuning.json"
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match="ignoring the corrupted tuning cache"):
        assert _tune_cache.lookup(path, "k") is None
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert _tune_cache.store(path, "k", {"num_warps": 8}) == {"num_warps": 8}
    _tune_cache.clear_memory()
    assert _tune_cache.lookup(path, "k") == {"num_warps": 8}  # rewritten whole


def test_unwritable_cache_warns_and_still_uses_the_config(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="could not write"):
        assert _tune_cache.store(blocker / "sub" / "c.json", "k", {"num_warps": 8}) == {"num_warps": 8}
    assert _tune_cache.lookup(blocker / "sub" / "c.json", "k") == {"num_warps": 8}


class _FakeKernel:
    """Records ``kernel[grid](*args, **kwargs)`` launches."""

    __name__ = "fake"

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_launch_passes_the_table_config_and_checks_the_grid():
    kernel = _FakeKernel()
    _tuning.launch(kernel, (5,), (1, 2), {"BLOCK": 16}, family="ln_fwd", values=8192, key=lambda: "k",
                   device=torch.device("cpu"))
    assert kernel.launches == [((5,), (1, 2), {"BLOCK": 16, "num_warps": 16, "enable_fp_fusion": True})]
    with pytest.raises(ValueError, match="grid"):
        _tuning.launch(kernel, (1, 70000), (), {}, family="ln_fwd", values=1, key=lambda: "k",
                       device=torch.device("cpu"))


@pytest.mark.parametrize("family", ["gn", "ln"])
def test_same_call_same_bits(family):
    """No timing by default: the same shape gives the same config, hence the same bits, every time."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(device)
    w = torch.randn(8, generator=gen).to(device)
    if family == "gn":
        runs = [gk.forward(x, 2, w, w, 1e-5, "silu")[0] for _ in range(2)]
    else:
        runs = [lk.forward(x, (5, 5), None, None, 1e-5)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_the_documented_table_is_the_code_s():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "kernels-rownorm.md").read_text()
    bounds = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    for family in _tuning.WARPS_TABLE:
        row = next(line for line in doc.splitlines() if f"(`{family}`" in line and line.startswith("|"))
        documented = [int(cell) for cell in row.strip("|").split("|")[1:]]
        assert documented == [_warps(family, b) for b in bounds], family


def test_a_neighbour_that_fails_is_skipped(monkeypatch, tmp_path):
    def measure(run, config):
        if config["num_warps"] == 32:
            raise RuntimeError("out of resources")
        return config["num_warps"]

    monkeypatch.setattr(_tuning, "measure", measure)
    options = [{"num_warps": 16}, {"num_warps": 32}, {"num_warps": 8}]
    assert _tuning.tuned(tmp_path / "t.json", "k", options, lambda c: None) == {"num_warps": 8}
