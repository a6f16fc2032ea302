"""experiments/calibration_size.py: its table survives a search export whose run folder is gone, and a prefix
refit of an export whose units were re-selected (the same units again) is refused with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def export_folder(path: Path, select: str) -> Path:
    path.mkdir(parents=True)
    compensation = {"method": "lstsq", "mode": "upstream", "damping": 1e-4, "select": select}
    calibration = {"dataset": "wikitext2", "split": "validation", "nsamples": 64, "seqlen": 512, "seed": 0,
                   "region": [0.0, 0.6]}
    (path / "subnet.json").write_text(json.dumps({
        "source": {"path": str(path / "no-model")}, "target_ratio": 0.9,
        "recipe": {"compensation": compensation, "calibration": calibration}}))
    return path


def test_the_table_has_the_search_row_of_an_export_whose_folder_is_gone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import calibration_size

    gone = str(tmp_path / "runs" / "gone" / "export")
    (tmp_path / "quality.json").write_text(json.dumps({"cells": {"0.9/final/seed0": {
        "export": gone, "ppl": {"ptb:validation": 54.3, "wikitext2": 24.7, "ptb": 53.5, "c4:heldout": 36.2},
        "seconds": {"export": 446.0}}}}))
    monkeypatch.setattr(calibration_size, "RESULTS", tmp_path)
    cell = {"export": gone, "ratio": 0.9, "nsamples": 256, "reform": {"mode": "upstream", "select": "prefix"},
            "calibration": {"dataset": "wikitext2+c4"}, "validation": 55.0, "wikitext2": 24.8, "ptb": 54.0,
            "c4:heldout": 36.5, "reform_s": 300.0}
    data = {"cells": {f"{gone}:256": cell}, "bf16_tflops": 0.4,
            "environment": {"machine": {"cpu": "cpu", "threads": 2}}}
    text = calibration_size.report(data)
    assert f"| {gone} | 0.9 | – (search) | – | – | 54.30 | 24.70 |" in text
    assert f"| {gone} | 0.9 | upstream, prefix units | wikitext2+c4 | 256 | 55.00 |" in text


def test_a_prefix_refit_of_re_selected_units_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import calibration_size

    export = export_folder(tmp_path / "export", select="obs")
    out = tmp_path / "calibration_size.json"
    status = calibration_size.main([str(export), "--nsamples", "8", "--selects", "prefix", "--out", str(out)])
    assert status == 2
    assert "re-selected (obs)" in capsys.readouterr().err  # before the (missing) source model is loaded
    assert not out.exists()
