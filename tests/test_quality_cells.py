"""experiments/quality.py: every measured cell's row, read with today's defaults, still gives the search the
cell ran (the config its run folder recorded, experiments/configs/quality/), so that a change of the defaults
cannot silently relabel the table's rows; and exactly the cells of today's defaults carry the ``*``."""

from __future__ import annotations

import json
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
