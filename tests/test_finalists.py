"""experiments/finalists.py: the exported finalists' KL to the dense model is the mean per-position KL
(full vocabulary when K is the vocabulary), the report marks the search's choice and ranks the
finalists, and a file measured with other settings is refused (exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import VOCAB, tiny_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_exported_kl_is_the_mean_kl_per_position(monkeypatch, token_ids):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import finalists

    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    ref = finalists.reference(dense, token_ids, top_k=VOCAB, batch_size=3)  # two batches, the last short
    with torch.no_grad():
        p = F.log_softmax(dense(token_ids).logits[:, :-1].float(), dim=-1)
        q = F.log_softmax(other(token_ids).logits[:, :-1].float(), dim=-1)
    direct = float(F.kl_div(q, p, log_target=True, reduction="sum")) / p[..., 0].numel()
    assert finalists.kl_to_reference(other, token_ids, ref) == pytest.approx(direct, rel=1e-4)
    assert finalists.kl_to_reference(dense, token_ids, ref) == pytest.approx(0.0, abs=1e-6)


def row(trial: int, rescored: float, exported: float, chosen: bool = False) -> dict:
    return {"trial": trial, "search_value": rescored, "rescored": rescored, "chosen_by_search": chosen,
            "exported_kl": exported, "rescoring_ppl": 40 + exported, "ptb_validation": 50 + exported,
            "test": {"wikitext2": 20 + exported, "ptb": 50 - exported}}


def test_the_report_marks_the_choice_and_ranks_the_finalists(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import finalists

    # the fitness's order is the exports' reversed: every correlation with it is -1
    rows = [row(1, 0.10, 0.30, chosen=True), row(2, 0.20, 0.20), row(3, 0.30, 0.10)]
    data = {"runs": {"runs/x": rows}, "ptb_windows": 16, "test_windows": 32, "out": str(tmp_path / "f.json"),
            "command": "python experiments/finalists.py runs/x", "environment": {"machine": {"cpu": "c", "threads": 2}}}
    text = finalists.report(data)
    assert "| 1 * | 0.1000 | 0.3000 |" in text and "| 2 | 0.2000 |" in text
    assert "| re-scored | -1.00 | -1.00 | -1.00 | 1.00 |" in text  # PTB test falls as the exports' KL rises
    assert "| exported KL | 1.00 | 1.00 | 1.00 | -1.00 |" in text


def test_unfinished_runs_and_files_of_other_settings_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import finalists

    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "finalists.json"
    assert finalists.main([str(run), "--out", str(out)]) == 2  # no best.json: the search has not finished
    assert "not a finished search run folder" in capsys.readouterr().err
    (run / "best.json").write_text("{}")
    out.write_text(json.dumps({"runs": {str(run): [row(1, 0.1, 0.1)]}, "ptb_windows": 8, "test_windows": 32}))
    assert finalists.main([str(run), "--out", str(out)]) == 2  # measured on 8 PTB windows, asked for 16
    assert "other settings" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md")) and json.loads(out.read_text())["ptb_windows"] == 8  # nothing written
