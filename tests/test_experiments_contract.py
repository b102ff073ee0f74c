"""Every experiment of ``normkit experiment``, in ``--quick`` mode: the files it writes, its schema, determinism."""

import json

import pytest

from normkit.experiments._harness import EXPERIMENTS, SCHEMA, Settings, run_experiment, write

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOLATILE = ("elapsed_s", "machine", "date")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_run_writes_json_png_and_markdown(name, quick_experiment, tmp_path):
    result = quick_experiment(name)
    paths = write(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    for key in ("schema", "name", "title", "claim", "config", "table", "measured", "seeds", "machine", "command",
                "validation"):
        assert key in data, key
    assert data["validation"]["examples"] > 0 and "test part only reports" in data["validation"]["used_for"]
    assert data["schema"] == SCHEMA and data["name"] == name and data["seeds"] == [0, 1] and data["quick"]
    columns, rows = data["table"]["columns"], data["table"]["rows"]
    assert rows and all(len(row) == len(columns) for row in rows)
    assert isinstance(data["measured"], str) and data["measured"]
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    markdown = paths["md"].read_text()
    assert data["claim"] in markdown and data["measured"] in markdown and f"]({name}.png)" in markdown


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_same_seeds_give_the_same_numbers(name, quick_experiment):
    again = run_experiment(name, Settings(quick=True, seeds=(0, 1)))
    strip = lambda result: {k: v for k, v in result.items() if k not in VOLATILE}  # noqa: E731
    assert json.dumps(strip(again), sort_keys=True) == json.dumps(strip(quick_experiment(name)), sort_keys=True)
