"""The experiment harness and ``normkit experiment``, driven by the convergence experiment in quick mode."""


import pytest
import torch

from normkit.cli import main
from normkit.experiments._harness import SCHEMA, Settings, report, run_experiment, write
from normkit.experiments.convergence import steps_ratio


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("convergence")


def test_result_schema(quick_result):
    for key in ("schema", "name", "title", "claim", "config", "table", "measured", "seeds", "machine", "command",
                "elapsed_s", "quick"):
        assert key in quick_result, key
    assert quick_result["schema"] == SCHEMA
    assert quick_result["seeds"] == [0, 1]
    assert quick_result["command"] == "normkit experiment convergence --seeds 2 --quick"
    columns = quick_result["table"]["columns"]
    assert all(len(row) == len(columns) for row in quick_result["table"]["rows"])
    assert {run["seed"] for run in quick_result["per_seed"]["bn"]} == {0, 1}
    assert quick_result["machine"]["torch_threads"] == 1


def test_threads_restored_after_a_run():
    before = torch.get_num_threads()
    run_experiment("convergence", Settings(quick=True, seeds=(0,)))
    assert torch.get_num_threads() == before


def test_report_links_figures_relative_to_the_report(quick_result, tmp_path):
    out = tmp_path / "docs" / "results"
    write(quick_result, out)
    path = tmp_path / "docs" / "RESULTS.md"
    report([quick_result], out, path, total_s=60.0)
    text = path.read_text()
    assert "![convergence](results/convergence.png)" in text
    assert "| [convergence](#convergence-steps-to-a-target-accuracy-with-and-without-batch-norm) |" in text


def test_unknown_experiment_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown experiment 'convergense'.*Did you mean 'convergence'"):
        run_experiment("convergense")


def test_no_seeds_is_an_error():
    with pytest.raises(ValueError, match="at least one seed"):
        run_experiment("convergence", Settings(seeds=()))


def test_steps_ratio_lower_bound_and_missing():
    assert steps_ratio(400, 100, 1000) == (4.0, False)
    assert steps_ratio(None, 200, 1000) == (5.0, True)
    assert steps_ratio(100, None, 1000) == (None, False)


def test_cli_writes_the_files_and_report(tmp_path, capsys):
    out, report_path = tmp_path / "results", tmp_path / "RESULTS.md"
    code = main(["experiment", "convergence", "--quick", "--seeds", "1", "--out", str(out), "--report",
                 str(report_path)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"convergence.json", "convergence.png", "convergence.md"}
    assert report_path.read_text().startswith("# Results")
    assert "What the article claims" in capsys.readouterr().out


def test_cli_rejects_unknown_names_and_bad_seeds(capsys):
    assert main(["experiment", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["experiment", "convergence", "--seeds", "0"]) == 2
    assert "expected a positive integer" in capsys.readouterr().err
