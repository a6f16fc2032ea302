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
