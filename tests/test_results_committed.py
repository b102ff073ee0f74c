"""docs/RESULTS.md and docs/results/ come from one full run of every experiment, within the time budget, and every
comparison there carries its confidence interval."""

import json
import re
from pathlib import Path

import pytest

from normkit.experiments._harness import EXPERIMENTS, SCHEMA, default_seeds

DOCS = Path(__file__).resolve().parents[1] / "docs"
BUDGET_MIN = 15.0


def _result(name):
    return json.loads((DOCS / "results" / f"{name}.json").read_text())


def _has_key(data, key):
    if isinstance(data, dict):
        return key in data or any(_has_key(v, key) for v in data.values())
    if isinstance(data, list):
        return any(_has_key(v, key) for v in data)
    return False


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_a_full_result_selected_on_validation_with_intervals(name):
    data = _result(name)
    assert data["schema"] == SCHEMA and not data["quick"]
    assert len(data["seeds"]) >= default_seeds(name) >= 3
    assert data["validation"]["examples"] > 0
    assert _has_key(data, "ci95"), f"{name}: no comparison carries a 95% CI"
    assert (DOCS / "results" / f"{name}.png").is_file() and (DOCS / "results" / f"{name}.md").is_file()


def test_results_page_is_the_same_run_as_the_json_and_within_budget():
    page = (DOCS / "RESULTS.md").read_text()
    results = [_result(name) for name in EXPERIMENTS]
    for data in results:
        assert data["measured"] in page, data["name"]
    assert len({data["date"] for data in results}) == 1
    minutes = float(re.search(r"\(([\d.]+) min in all", page).group(1))
    assert minutes <= BUDGET_MIN
    assert "--quick" not in page.split("\n\n")[1]
