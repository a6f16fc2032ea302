"""experiments/fitness_rank.py resumes: the rows an interrupted run measured are kept while they are the
pool's candidates at their places; a file of another configuration is refused (exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def subnet(channels: int) -> SimpleNamespace:
    return SimpleNamespace(layers=[SimpleNamespace(kv_heads=3, q_per_kv=3, channels=channels)])


def test_an_interrupted_run_resumes_after_its_last_candidate(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import fitness_rank

    config = {"per_ratio": 2, "zeroshot": 0, "zeroshot_limit": 100, "windows": 8, "seed": 0}
    pool = [(0.5, subnet(512)), (0.5, subnet(520)), (0.6, subnet(700))]
    rows = [{"ratio": ratio, "widths": fitness_rank.widths_of(s), "fitness_kl": 1.0} for ratio, s in pool[:2]]
    out = tmp_path / "fitness_rank.json"
    assert fitness_rank.finished_rows(out, config, pool) == []  # nothing measured yet
    out.write_text(json.dumps({"config": config, "rows": rows, "seconds": 5.0}))
    assert fitness_rank.finished_rows(out, config, pool) == rows
    # a pool that differs from the second candidate on (other code, other candidates) keeps only the first
    changed = [pool[0], (0.5, subnet(528)), pool[2]]
    assert fitness_rank.finished_rows(out, config, changed) == rows[:1]
    with pytest.raises(SystemExit) as refused:
        fitness_rank.finished_rows(out, {**config, "windows": 4}, pool)
    assert refused.value.code == 2 and "another configuration" in capsys.readouterr().err
