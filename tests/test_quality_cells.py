"""experiments/quality.py: every measured cell's row, read with today's defaults, still gives the search the
cell ran (the config its run folder recorded, experiments/configs/quality/), so that a change of the defaults
cannot silently relabel the table's rows; and exactly the cells of today's defaults carry the ``*``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from search.config import SearchConfig
from search.rundir import load_config_file

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_each_cell_row_gives_the_search_it_ran(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import quality

    cells = json.loads((EXPERIMENTS / "results" / "quality.json").read_text())["cells"]
    assert cells
    for key, cell in cells.items():
        ran = load_config_file(quality.CONFIGS / f"{cell['ratio']}-{cell['row']}-seed{cell['seed']}.yaml")
        read = quality.measured_config(cell)
        assert (read.identity(), read.trials) == (ran.identity(), ran.trials), key
        today = SearchConfig.create("smollm2-135m", cell["ratio"], seed=cell["seed"], eval_windows=32,
                                    eval_datasets=quality.EVAL, dtype=ran.dtype, export_pass_dtype=ran.dtype)
        assert quality.is_default(cell) == ((ran.identity(), ran.trials) == (today.identity(), today.trials)), key


def test_cells_timed_before_the_preparation_read_it_from_their_run_folder(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import quality

    def cell(name: str, started: float, trials_began: float | None, **extra) -> dict:
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("x")
        os.utime(run_dir / "config.yaml", (started, started))
        if trials_began is not None:
            (run_dir / "study.json").write_text("{}")
            os.utime(run_dir / "study.json", (trials_began, trials_began))
        return {"export": str(run_dir / "export"), "seconds": {"search": 5.0}, **extra}

    cells = {"once": cell("once", 1000.0, 1300.0), "resumed": cell("resumed", 2000.0, 1300.0),
             "no study": cell("no study", 1000.0, None), "copied": cell("copied", 1000.0, 1300.0, search_from="k"),
             "timed": {"export": "gone/export", "seconds": {"prepare": 7.0, "search": 5.0}}}
    assert quality.fill_prepare_seconds(cells)
    assert cells["once"]["seconds"]["prepare"] == 300.0 and cells["once"]["prepare_from"] == "run folder file times"
    for name in ("resumed", "no study", "copied"):  # the file times do not tell: left unknown, and said so
        assert "prepare" not in cells[name]["seconds"] and cells[name]["prepare_from"] == "not recorded", name
    assert cells["timed"]["seconds"]["prepare"] == 7.0 and "prepare_from" not in cells["timed"]
    assert not quality.fill_prepare_seconds(cells)  # read once


def test_a_cell_whose_preparation_was_shorter_than_its_unit_order_read_that_order(monkeypatch, tmp_path):
    """Cells measured before the search recorded its unit order: a preparation that took less than the
    order (its run folder's importance.pt keeps those seconds) cannot have computed it."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import quality
    from space.scores.cache import save_scores

    def cell(name: str, prepare: float | None, order_seconds: float | None) -> dict:
        run_dir = tmp_path / name
        run_dir.mkdir()
        if order_seconds is not None:
            save_scores(run_dir / "importance.pt", {}, {"k": 1}, seconds=order_seconds)
        return {"export": str(run_dir / "export"), "seconds": {"search": 5.0, **({} if prepare is None else
                                                                                {"prepare": prepare})}}

    cells = {"read": cell("read", 90.0, 360.0), "computed": cell("computed", 450.0, 360.0),
             "untimed": cell("untimed", None, 360.0), "gone": cell("gone", 90.0, None)}
    assert quality.fill_unit_order(cells)
    assert cells["read"]["unit_order"]["reused"] and cells["read"]["unit_order"]["seconds"] == 360.0
    assert all("unit_order" not in cells[name] for name in ("computed", "untimed", "gone"))  # not told: unmarked
    assert not quality.fill_unit_order(cells)  # read once
    assert quality.prepare_text(cells["read"]) == "90 (order cached: 360)"
    assert quality.prepare_text(cells["computed"]) == "450" and quality.prepare_text(cells["untimed"]) == "–"
