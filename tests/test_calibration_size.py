"""experiments/calibration_size.py: its table shows the search's figures each cell was measured beside, and a prefix
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


def test_a_cell_keeps_the_search_figures_it_was_measured_beside(tmp_path, monkeypatch):
    """The search's row comes from the cell, not from quality.json at report time: a search re-run later into
    the same folder (new figures there, its old export gone) leaves the earlier cells' rows as measured."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import calibration_size

    export = tmp_path / "runs" / "0.9" / "export"
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"cells": {"0.9/final/seed0": {
        "export": str(export), "ppl": {"ptb:validation": 54.3, "wikitext2": 24.7, "ptb": 53.5, "c4:heldout": 36.2},
        "seconds": {"export": 446.0}}}}))
    monkeypatch.setattr(calibration_size, "RESULTS", tmp_path)
    recipe = {"compensation": {"mode": "upstream"}, "calibration": {"dataset": "wikitext2", "nsamples": 64},
              "export_calibration": {"dataset": "wikitext2+c4", "nsamples": 256}}
    own = calibration_size.search_export(export, recipe)
    assert own == {"mode": "upstream", "text": "wikitext2+c4", "windows": 256, "export_s": 446.0,
                   "ppl": {"ptb:validation": 54.3, "wikitext2": 24.7, "ptb": 53.5, "c4:heldout": 36.2}}
    assert calibration_size.search_export(tmp_path / "other" / "export", recipe) is None

    quality.write_text(json.dumps({"cells": {"0.9/final/seed0": {  # the re-run
        "export": str(export), "ppl": {"ptb:validation": 60.0, "wikitext2": 26.0, "ptb": 58.0, "c4:heldout": 40.0},
        "seconds": {"export": 300.0}}}}))
    cell = {"export": str(export), "ratio": 0.9, "nsamples": 256, "reform": {"mode": "upstream", "select": "prefix"},
            "calibration": {"dataset": "wikitext2+c4", "seqlen": 512}, "validation": 55.0, "wikitext2": 24.8, "ptb": 54.0,
            "c4:heldout": 36.5, "reform_s": 300.0, "search": own}
    # a refit on windows of 2048, with the short windows measured (the earlier cells: without them)
    long = {**cell, "nsamples": 64, "calibration": {"dataset": "wikitext2+c4", "seqlen": 2048}, "wikitext2_128": 70.0}
    data = {"cells": {f"{export}:256": cell, f"{export}:64": {**cell, "nsamples": 64},
                      f"{export}:64:seqlen=2048": long}, "bf16_tflops": 0.4,
            "environment": {"machine": {"cpu": "cpu", "threads": 2}}}
    text = calibration_size.report(data)
    assert text.count(f"| {export} | 0.9 | upstream (search) | wikitext2+c4 | 256 | 54.30 | 24.70 | – | 53.50 | 36.20 | "
                      "446 |") == 1
    assert f"| {export} | 0.9 | upstream, prefix units | wikitext2+c4 | 256 x 512 | 55.00 | 24.80 | – | 54.00 |" in text
    assert f"| {export} | 0.9 | upstream, prefix units | wikitext2+c4 | 64 x 2048 | 55.00 | 24.80 | 70.00 | 54.00 |" in text
    assert "26.00" not in text


def test_a_prefix_refit_of_re_selected_units_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import calibration_size

    export = export_folder(tmp_path / "export", select="obs")
    out = tmp_path / "calibration_size.json"
    status = calibration_size.main([str(export), "--nsamples", "8", "--selects", "prefix", "--out", str(out)])
    assert status == 2
    assert "re-selected (obs)" in capsys.readouterr().err  # before the (missing) source model is loaded
    assert not out.exists()


def test_another_draw_of_the_calibration_windows_is_its_own_cell(tmp_path, monkeypatch):
    """--calib-seeds: the same winner refitted on windows drawn with another seed (same text, region, count)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import calibration_size

    export = export_folder(tmp_path / "export", select="prefix")
    fitted = []
    monkeypatch.setattr(calibration_size, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(calibration_size, "reform_export",
                        lambda loaded, record, *, calibration, **k: fitted.append(calibration))
    monkeypatch.setattr(calibration_size, "measure", lambda path: {
        "validation": 55.0, "wikitext2": 24.8, "ptb": 54.0, "c4:heldout": 36.5, "wikitext2_128": 70.0})
    monkeypatch.setattr(calibration_size, "RESULTS", tmp_path)
    out = tmp_path / "calibration_size.json"
    assert calibration_size.main([str(export), "--nsamples", "8", "--calib-seeds", "3", "--out", str(out)]) == 0
    assert [(c.seed, c.region, c.nsamples) for c in fitted] == [(3, (0.0, 0.6), 8)]
    cells = json.loads(out.read_text())["cells"]
    assert list(cells) == [f"{export}:8:seed=3"]
    assert f"| {export} | 0.9 | upstream | wikitext2 (seed 3) | 8 x 512 |" in out.with_suffix(".md").read_text()
    assert calibration_size.main([str(export), "--nsamples", "8", "--out", str(out)]) == 0  # the export's own draw
    assert fitted[-1].seed == 0 and f"{export}:8" in json.loads(out.read_text())["cells"]
