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


def test_the_table_ranks_within_each_ratio_and_counts_accuracy_as_higher_better(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import fitness_rank

    rows = []
    for ratio, offset in ((0.5, 100.0), (0.6, 10.0)):
        for i in range(4):
            # ppl fitness follows the held-out texts everywhere; kl follows them across the ratios only (its
            # order is reversed inside each ratio); the accuracy falls as the perplexities rise
            rows.append({"ratio": ratio, "fitness_ppl": offset + i, "fitness_kl": offset - i,
                         "wikitext2:rescoring": offset + i, "ptb:validation": offset + 2 * i,
                         "c4:heldout": offset + i, "zeroshot": 1.0 - (offset + i) / 1000})
    table = fitness_rank.spearman_table(rows)
    assert table["ptb:validation/ppl"]["within_ratio"] == {"0.5": pytest.approx(1.0), "0.6": pytest.approx(1.0)}
    assert table["ptb:validation/kl"]["within_ratio_mean"] == pytest.approx(-1.0)
    assert table["ptb:validation/kl"]["all"] > 0.5  # the ratios' offsets dominate the pooled ranks
    assert table["zeroshot/ppl"]["all"] == pytest.approx(1.0)  # lower fitness, higher accuracy: agreement
    assert "0.7" not in table["zeroshot/ppl"]["within_ratio"]  # no candidates there
    reversed_inside = fitness_rank.kl_minus_ppl(rows, "ptb:validation", resamples=50)
    assert reversed_inside["difference"] == pytest.approx(-2.0)
    assert reversed_inside["above_zero"] == 0.0 and reversed_inside["p95"] < 0
    data = {"rows": rows, "config": {"windows": 8, "zeroshot_limit": 100}, "seconds": 60.0, "command": "x",
            "environment": {"machine": {"cpu": "cpu", "threads": 2}}}
    out = tmp_path / "fitness_rank.json"
    out.with_suffix(".notes.md").write_text("hand-written finding\n")
    text = fitness_rank.report(data, out)
    assert "| ptb:validation | kl | " in text and "| ptb:validation | -2.000 |" in text
    assert text.rstrip().endswith("hand-written finding")
    # a file of an earlier form of the table (no per-ratio values) gets today's from its rows
    out.write_text(json.dumps({**data, "spearman": {"ptb:validation/kl": {"all": 0.0}}}))
    assert fitness_rank.write_report(out) == out.with_suffix(".md").read_text()
    assert json.loads(out.read_text())["spearman"] == table
