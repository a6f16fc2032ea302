"""experiments/stage_decisions.py: a generation's decision after each prefix of the last stage's batches
is compared with the decision on all of them; generations without an incumbent or without the record
are left out; a folder that is not a run is one clear error (exit status 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def entry(generation: int, challenger: list[float], incumbent: list[float]) -> dict:
    return {"generation": generation, "challenger": challenger[-1], "value": min(challenger[-1], incumbent[-1] if incumbent else 9),
            "batches": {"challenger": challenger, "incumbent": incumbent}}


def test_decisions_on_fewer_batches_are_compared_with_the_whole_stage(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import stage_decisions

    history = [entry(0, [1.2, 1.1], []),  # no incumbent yet
               entry(1, [1.0, 0.9], [1.1, 1.0]),  # the challenger wins on both prefixes
               entry(2, [0.9, 1.05], [1.0, 1.0]),  # wins on the first batch, loses on both: different
               {"generation": 3, "challenger": 1.0, "value": 1.0},  # a run older than the record
               entry(4, [1.3, 1.2], [1.2, 1.25])]  # loses on the first, wins on both: different
    rows = stage_decisions.decisions(history)
    assert [r["generation"] for r in rows] == [1, 2, 4]
    first, whole = stage_decisions.agreement(rows)
    assert (first["same"], first["generations"], first["replacements_on_all"]) == (1, 3, 2)
    assert first["largest_gap_where_different"] == pytest.approx(0.05 / 1.0)
    assert whole["same"] == 3 and whole["largest_gap_where_different"] == 0.0
    # batches alone: generation 1 0.8 < 0.9 both halves; 2: 0.9 < 1.0 then 1.2 > 1.0; 4: 1.3 > 1.2 then 1.1 < 1.3
    assert stage_decisions.alone([0.9, 1.05]) == pytest.approx([0.9, 1.2])
    assert stage_decisions.halves(rows) == {"generations": 3, "same": 1}
    # first-batch gaps: 1: 0.1/1.1 = 9.1 %, 2: 10 % (then decided otherwise), 4: 0.1/1.2 = 8.3 % (otherwise)
    loose, tight = stage_decisions.early_stops(rows, [0.085, 0.095])
    assert (loose["stopped"], loose["changed"]) == (2, 1)
    assert (tight["stopped"], tight["changed"]) == (1, 1)


def test_a_folder_without_a_journal_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import stage_decisions
    from search.cli.common import exit_status

    assert exit_status(stage_decisions.main, [str(tmp_path)]) == 2
    assert "not a search run folder" in capsys.readouterr().err
