"""experiments/compare.py on a tiny model and tiny text: the cells it promises, resuming, the
search and Týr rows read from quality.py's cells, and the refusal of a file of another comparison."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from tests.zeroshot_data import write_tiny_zeroshot_data

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
METRICS = ("wikitext2_2048", "wikitext2_128", "ptb_2048")


@pytest.fixture
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # compare.py imports compare_report as a sibling script
    import compare

    return compare


@pytest.fixture
def zeroshot_data(tiny_text_dir, tmp_path, monkeypatch) -> Path:
    """The tiny texts with the seven zero-shot tasks beside them, as LLM_PRUNER_DATA."""
    data = shutil.copytree(tiny_text_dir, tmp_path / "data")
    write_tiny_zeroshot_data(data)
    monkeypatch.setenv("LLM_PRUNER_DATA", str(data))
    return data


def argv_of(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--ratios", "0.5", "--recipes", "wanda-sp", "--windows", "1",
            "--held-out", "ptb", "--out", str(out), *extra]


def run(compare, model_dir: Path, out: Path, *extra: str) -> dict:
    assert compare.main(argv_of(model_dir, out, *extra)) == 0
    return json.loads(out.with_suffix(".json").read_text())


def quality_file(path: Path, export: Path, rows=((0.5, "defaults", 40.0), (0.5, "tyr", 30.0))) -> Path:
    """quality.py's cells of ``rows`` (ratio, row, WikiText-2 perplexity; PTB twice that), their exports at
    ``export`` (the short windows are measured on it; the ``defaults`` row's preparation not timed)."""
    cells = {f"{ratio}/{row}/seed0": {"ppl": {"wikitext2": value, "ptb": 2 * value}, "block_ratio": ratio,
                                      "seconds": {**({} if row == "defaults" else {"prepare": 2.0}),
                                                  "search": 10.0, "export": 1.0, "test": 99.0},
                                      "options": {"trials": 4}, "trials": 4, "export": str(export)}
             for ratio, row, value in rows}
    path.write_text(json.dumps({"cells": cells}))
    return path


def test_compare_writes_every_cell_resumes_and_reads_the_search_rows(compare, tiny_model_dir, tiny_data, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "compare"
    quality = quality_file(tmp_path / "quality.json", tiny_model_dir)
    results = run(compare, tiny_model_dir, out, "--lstsq-rows", "--search-cells", str(quality), "defaults",
                  "--tyr-rows", "tyr")
    cells = results["cells"]
    assert set(cells) == {"dense", "wanda-sp:0.5", "wanda-sp + lstsq:0.5", "search:0.5", "tyr:0.5"}
    for key in ("dense", "wanda-sp:0.5", "wanda-sp + lstsq:0.5"):
        assert all(math.isfinite(cells[key]["metrics"][m]["ppl"]) for m in METRICS), key
    for key in ("wanda-sp:0.5", "wanda-sp + lstsq:0.5"):
        assert abs(cells[key]["block_ratio"] - 0.5) < 0.02
    # the least-squares row is the same selection with the search's compensation: other weights, other numbers
    assert cells["wanda-sp + lstsq:0.5"]["widths"] == cells["wanda-sp:0.5"]["widths"]
    assert cells["wanda-sp + lstsq:0.5"]["metrics"] != cells["wanda-sp:0.5"]["metrics"]
    assert "short_by_seed" not in cells["search:0.5"]  # no other seed: no entry
    # the search rows come from quality.py's cells, without the test evaluation's time
    assert cells["search:0.5"]["metrics"]["ptb_2048"]["ppl"] == 80.0
    # ...but for the short windows, measured on their export (here the dense tiny model: the dense row's)
    assert cells["search:0.5"]["metrics"]["wikitext2_128"]["ppl"] == pytest.approx(
        cells["dense"]["metrics"]["wikitext2_128"]["ppl"], rel=1e-4)
    assert cells["tyr:0.5"]["recipe_seconds"] == 13.0
    assert cells["search:0.5"]["recipe_seconds"] == 11.0  # its preparation unknown: a lower bound, marked
    assert "| search | ≥ 11 |" in out.with_suffix(".md").read_text()
    report = out.with_suffix(".md").read_text()
    assert "| tyr | " in report and "| wanda-sp + lstsq | " in report
    assert out.with_suffix(".png").is_file()

    # a re-run keeps every finished cell (a marked value survives) and recomputes nothing
    marked = json.loads(out.with_suffix(".json").read_text())
    marked["cells"]["wanda-sp:0.5"]["metrics"]["ptb_2048"]["ppl"] = 1234.5
    out.with_suffix(".json").write_text(json.dumps(marked))
    again = run(compare, tiny_model_dir, out, "--lstsq-rows", "--search-cells", str(quality), "defaults",
                "--tyr-rows", "tyr")
    assert again["cells"]["wanda-sp:0.5"]["metrics"]["ptb_2048"]["ppl"] == 1234.5
    assert "1234" in out.with_suffix(".md").read_text()
    # ...but a search row takes its quality.py cell's seconds as they stand (a preparation read since)
    timed = json.loads(quality.read_text())
    timed["cells"]["0.5/defaults/seed0"]["seconds"]["prepare"] = 5.0
    quality.write_text(json.dumps(timed))
    again = run(compare, tiny_model_dir, out, "--lstsq-rows", "--search-cells", str(quality), "defaults",
                "--tyr-rows", "tyr")
    assert again["cells"]["search:0.5"]["recipe_seconds"] == 16.0
    assert again["cells"]["search:0.5"]["metrics"] == cells["search:0.5"]["metrics"]
    # ...and a unit order its preparation read from the score cache counts with what computing it took
    timed["cells"]["0.5/defaults/seed0"]["unit_order"] = {"seconds": 4.0, "reused": True}
    quality.write_text(json.dumps(timed))
    again = run(compare, tiny_model_dir, out, "--lstsq-rows", "--search-cells", str(quality), "defaults",
                "--tyr-rows", "tyr")
    assert again["cells"]["search:0.5"]["recipe_seconds"] == 20.0
    assert again["cells"]["search:0.5"]["record"]["seconds"]["order_cached"] == 4.0
    assert "| search | 16 + 4 cached order |" in out.with_suffix(".md").read_text()

    # a quality.py cell measured again (another machine, no export there) replaces its row; the others stay
    remeasured = json.loads(quality.read_text())
    remeasured["cells"]["0.5/defaults/seed0"]["ppl"] = {"wikitext2": 41.0, "ptb": 83.0}
    quality.write_text(json.dumps(remeasured))
    again = run(compare, tiny_model_dir, out, "--lstsq-rows", "--search-cells", str(quality), "defaults",
                "--tyr-rows", "tyr")
    assert again["cells"]["search:0.5"]["metrics"]["ptb_2048"]["ppl"] == 83.0
    assert again["cells"]["tyr:0.5"] == cells["tyr:0.5"]
    assert again["cells"]["wanda-sp:0.5"]["metrics"]["ptb_2048"]["ppl"] == 1234.5
    # ...and so does one measured again to the same numbers into another export (the zero-shot reads it)
    (tmp_path / "moved").symlink_to(tiny_model_dir)
    remeasured["cells"]["0.5/defaults/seed0"]["export"] = str(tmp_path / "moved")
    quality.write_text(json.dumps(remeasured))
    again = run(compare, tiny_model_dir, out, "--lstsq-rows", "--search-cells", str(quality), "defaults",
                "--tyr-rows", "tyr")
    assert again["cells"]["search:0.5"]["record"]["export"] == str(tmp_path / "moved")

    # another seed of the search row: its short windows measured on its export, once, again when it changes
    remeasured["cells"]["0.5/defaults/seed1"] = {**remeasured["cells"]["0.5/defaults/seed0"], "export": str(tiny_model_dir)}
    quality.write_text(json.dumps(remeasured))
    again = run(compare, tiny_model_dir, out, "--search-cells", str(quality), "defaults", "--tyr-rows", "tyr")
    seed1 = again["cells"]["search:0.5"]["short_by_seed"]["1"]
    assert seed1["wikitext2_128"]["ppl"] == pytest.approx(cells["dense"]["metrics"]["wikitext2_128"]["ppl"], rel=1e-4)
    seed1["wikitext2_128"]["ppl"] = 7.0
    out.with_suffix(".json").write_text(json.dumps(again))
    again = run(compare, tiny_model_dir, out, "--search-cells", str(quality), "defaults", "--tyr-rows", "tyr")
    assert again["cells"]["search:0.5"]["short_by_seed"]["1"]["wikitext2_128"]["ppl"] == 7.0
    remeasured["cells"]["0.5/defaults/seed1"]["ppl"] = {"wikitext2": 42.0, "ptb": 84.0}
    quality.write_text(json.dumps(remeasured))
    again = run(compare, tiny_model_dir, out, "--search-cells", str(quality), "defaults", "--tyr-rows", "tyr")
    assert again["cells"]["search:0.5"]["short_by_seed"]["1"]["wikitext2_128"]["ppl"] != 7.0
    assert "| search | 0.5 | 0, 1 |" in out.with_suffix(".md").read_text()

    # --report writes the report from the JSON alone: no model is loaded
    marked["cells"]["wanda-sp:0.5"]["metrics"]["ptb_2048"]["ppl"] = 2222.0
    out.with_suffix(".json").write_text(json.dumps(marked))
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("--report loaded a model"))
    assert compare.main(["--model", str(tiny_model_dir), "--ratios", "0.5", "--recipes", "wanda-sp", "--windows", "1",
                         "--held-out", "ptb", "--out", str(out), "--report"]) == 0
    assert "2222" in out.with_suffix(".md").read_text()


def test_a_file_of_another_comparison_is_refused(compare, tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "compare"
    out.with_suffix(".json").write_text(json.dumps({"config": {"model": "other"}, "cells": {}}))
    assert compare.main(argv_of(tiny_model_dir, out)) == 2
    assert "another comparison" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["config"] == {"model": "other"}


def test_zeroshot_joins_a_finished_comparison_without_changing_its_perplexities(compare, tiny_model_dir, zeroshot_data,
                                                                                tmp_path):
    """--zeroshot on a comparison measured without it: the dense model and every row at --zeroshot-ratios
    get the seven tasks' average (a recipe runs again, its perplexities kept; a search row takes
    quality.py's scores where it measured them on the same export with the same limit, else is measured on
    its export), and the report has their table."""
    out = tmp_path / "compare"
    quality = quality_file(tmp_path / "quality.json", tiny_model_dir)
    rows = ("--search-cells", str(quality), "defaults", "--tyr-rows", "tyr")
    first = run(compare, tiny_model_dir, out, *rows)
    assert all("zeroshot" not in cell for cell in first["cells"].values())
    marked = json.loads(quality.read_text())
    marked["zeroshot"] = {"0.5/tyr/seed0": {"limit": 2, "scores": {"average": 0.123}, "seconds": 1.0,
                                            "export": str(tiny_model_dir)}}
    quality.write_text(json.dumps(marked))
    cells = run(compare, tiny_model_dir, out, *rows, "--zeroshot", "2", "--zeroshot-ratios", "0.5")["cells"]
    assert {k for k, c in cells.items() if "zeroshot" in c} == set(cells)
    for key in cells:
        assert cells[key]["metrics"] == first["cells"][key]["metrics"], key
    dense = cells["dense"]["zeroshot"]
    assert dense["limit"] == 2 and 0 <= dense["scores"]["average"] <= 1 and len(dense["scores"]) == 8
    assert cells["tyr:0.5"]["zeroshot"]["scores"]["average"] == 0.123  # quality.py's, not measured again
    # the search row's export is the tiny dense model: measured there, the dense model's scores
    assert cells["search:0.5"]["zeroshot"]["scores"] == dense["scores"]
    assert cells["wanda-sp:0.5"]["zeroshot"]["limit"] == 2
    report = out.with_suffix(".md").read_text()
    assert "## Zero-shot average" in report and "| tyr | 0.123 |" in report and "0.5, zero-shot average" in report


def test_zeroshot_of_a_search_row_whose_export_is_gone_reads_quality_or_says_what_to_run(
        compare, tiny_model_dir, zeroshot_data, tmp_path, capsys):
    """Search rows read before compare.json kept their export path, on a machine where that export is gone
    (run folders stay where they ran): --zeroshot takes quality.py's scores of that export; where
    quality.py has none, one clear message names the command to run, and nothing measured is lost."""
    export = shutil.copytree(tiny_model_dir, tmp_path / "export")
    out = tmp_path / "compare"
    quality = quality_file(tmp_path / "quality.json", export)
    rows = ("--search-cells", str(quality), "defaults", "--tyr-rows", "tyr")
    first = run(compare, tiny_model_dir, out, *rows)
    for key in ("search:0.5", "tyr:0.5"):  # as written before records kept the export
        del first["cells"][key]["record"]["export"]
    out.with_suffix(".json").write_text(json.dumps(first))
    shutil.rmtree(export)
    marked = json.loads(quality.read_text())
    marked["zeroshot"] = {"0.5/tyr/seed0": {"limit": 2, "scores": {"average": 0.123}, "seconds": 1.0,
                                            "export": str(export)}}
    quality.write_text(json.dumps(marked))
    zeroshot = ("--zeroshot", "2", "--zeroshot-ratios", "0.5")
    assert compare.main(argv_of(tiny_model_dir, out, *rows, *zeroshot)) == 2
    assert re.search("0.5/defaults/seed0: its export .* is not on this machine", capsys.readouterr().err)
    kept = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert "zeroshot" in kept["dense"] and "zeroshot" in kept["wanda-sp:0.5"]
    marked["zeroshot"]["0.5/defaults/seed0"] = {"limit": 2, "scores": {"average": 0.321}, "seconds": 1.0,
                                                "export": str(export)}
    quality.write_text(json.dumps(marked))
    cells = run(compare, tiny_model_dir, out, *rows, *zeroshot)["cells"]
    assert cells["search:0.5"]["zeroshot"]["scores"]["average"] == 0.321
    assert cells["tyr:0.5"]["zeroshot"]["scores"]["average"] == 0.123  # read, the export not needed
    assert cells["search:0.5"]["record"]["export"] == str(export)
    for key in cells:
        assert cells[key]["metrics"] == first["cells"][key]["metrics"], key


def test_the_report_shows_every_seed_of_the_searches_and_compares_their_means(compare, tmp_path):
    """The search and Týr rows at seed 0 come with the other seeds quality.py ran: a table of each seed
    and the mean, and a verdict on the means over the seeds both ran, for each Týr row that has two of them."""
    import compare_report

    quality = tmp_path / "quality.json"
    seeds = {("final", 0): 40.0, ("final", 1): 44.0, ("final", 2): 30.0, ("tyr", 0): 41.0, ("tyr", 1): 47.0,
             ("tyr-equal", 0): 39.0, ("tyr-equal", 1): 43.0}
    quality.write_text(json.dumps({"cells": {f"0.5/{row}/seed{s}": {"ppl": {"wikitext2": v, "ptb": 2 * v}}
                                             for (row, s), v in seeds.items()}}))
    metrics = {"wikitext2_2048": {"ppl": 1.0}, "wikitext2_128": {"ppl": 1.0}, "ptb_2048": {"ppl": 1.0}}
    cells = {f"{name}:0.5": {"kind": "search", "metrics": metrics, "record": {"from": f"{quality} 0.5/{row}/seed0"}}
             for name, row in (("search", "final"), ("tyr", "tyr"), ("tyr (search's calibration)", "tyr-equal"))}
    # the short windows of a seed other than 0, where compare.py measured them on its export
    for name, value in (("search", 3.0), ("tyr (search's calibration)", 2.0)):
        cells[f"{name}:0.5"]["short_by_seed"] = {"1": {"wikitext2_2048": 0.0, "wikitext2_128": {"ppl": value}}}
    cells["dense"] = {"metrics": metrics}
    config = {"short_seqlen": 128, "held_out": ["ptb"], "windows_2048": 32, "dtype": "float32",
              "max_calib_tokens": None}
    compare_report.write_report({"config": config, "cells": cells}, tmp_path / "compare")
    report = (tmp_path / "compare.md").read_text()
    assert ("| search | 0.5 | 0, 1, 2 | 40.00 / 44.00 / 30.00 (mean 38.00) | 1.00 / 3.00 / – | "
            "80.00 / 88.00 / 60.00 (mean 76.00) |") in report
    assert "| tyr | 0.5 | 0, 1 | 41.00 / 47.00 (mean 44.00) | 1.00 / – |" in report
    # each mean's gap over the seeds both ran (not the search's seed 2), with the search's difference at each
    # (40 vs 41, 44 vs 47)
    assert "means over seeds 0, 1, tyr against the search: wikitext2 44.00 vs 42.00 (-4.5%; per seed -2.4 / -6.4 %); " \
        "ptb 88.00 vs 84.00 (-4.5%; per seed -2.4 / -6.4 %)\n" in report
    # every Týr row with seeds, the one with the search's calibration too, its short windows where both have them
    assert "| tyr (search's calibration) | 0.5 | 0, 1 | 39.00 / 43.00 (mean 41.00) | 1.00 / 2.00 (mean 1.50) |" in report
    assert ("tyr (search's calibration) against the search: wikitext2 41.00 vs 42.00 (+2.4%; per seed +2.6 / +2.3 %); "
            "ptb 82.00 vs 84.00 (+2.4%; per seed +2.6 / +2.3 %); wikitext2 in windows of 128 1.50 vs 2.00 (+33.3%; "
            "per seed +0.0 / +50.0 %)") in report


def test_calib_as_search_gives_every_recipe_the_searchs_export_windows(compare, tiny_model_dir, tiny_data, tmp_path):
    """With --calib-as-search each recipe scores and compensates on the windows the search's export
    fits on at that ratio (WikiText-2 + c4:calib above 0.6, 256 windows): its rows are labelled, their
    records say so, and the plain rows' file is not mixed with them."""
    from search.config import SearchConfig

    out = tmp_path / "calib-as-search"
    argv = ["--model", str(tiny_model_dir), "--ratios", "0.7", "--recipes", "wanda-sp", "--windows", "1",
            "--held-out", "ptb", "--lstsq-rows", "--out", str(out), "--calib-as-search"]
    assert compare.main(argv) == 0
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert set(cells) == {"dense", "wanda-sp (search's calibration):0.7", "wanda-sp + lstsq (search's calibration):0.7"}
    wanted = SearchConfig.create(str(tiny_model_dir), 0.7).export_calibration_spec().to_dict()
    assert wanted["dataset"] == "wikitext2+c4" and wanted["nsamples"] == 256
    for cell in (c for k, c in cells.items() if k != "dense"):
        assert cell["record"]["recipe"]["calibration"] == wanted
    assert cells["wanda-sp + lstsq (search's calibration):0.7"]["record"]["recipe"]["reform_calibration"] == wanted
    assert "256 x 512 (wikitext2+c4 validation+calib)" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit) as refused:
        compare.main([*argv, "--max-calib-tokens", "2048"])
    assert refused.value.code == 2


def test_quality_runs_a_cell_again_for_a_zeroshot_when_its_export_is_not_here(tmp_path, monkeypatch):
    """quality.py --zeroshot on a cell measured on another machine (its export folder is not here): the
    search runs again, the new numbers replace the cell's with the earlier ones kept beside them, and the
    zero-shot is measured on the new export; a cell whose export is here is not run again."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import quality

    here = tmp_path / "export-here"
    here.mkdir()
    out = tmp_path / "quality.json"
    earlier = {"ppl": {"wikitext2": 40.0}, "seconds": {"search": 1.0}, "export": str(tmp_path / "gone"),
               "ratio": 0.7, "row": "final", "seed": 0, "options": {"trials": 4}}
    out.write_text(json.dumps({"dense": {}, "cells": {"0.7/final/seed0": earlier,
                                                      "0.5/final/seed0": {**earlier, "export": str(here)}},
                               "zeroshot": {"0.7/final/seed0": {"export": str(tmp_path / "gone")}}}))
    searched = []

    def search_cell(ratio, row, seed, runs, trials, cells, dtype="bfloat16"):
        searched.append(ratio)
        return {**earlier, "ppl": {"wikitext2": 41.0}, "export": str(here)}

    monkeypatch.setattr(quality, "search_cell", search_cell)
    monkeypatch.setattr(quality, "zeroshot_cell", lambda export, limit: {"limit": limit, "scores": {"average": 0.4}})
    monkeypatch.setattr(quality, "matmul_tflops", lambda dtype: 1.0)
    monkeypatch.setattr(quality, "report", lambda data: "")
    assert quality.main(["--ratios", "0.7", "0.5", "--rows", "final", "--zeroshot", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert searched == [0.7]
    assert data["cells"]["0.7/final/seed0"]["ppl"] == {"wikitext2": 41.0}
    assert data["cells"]["0.7/final/seed0"]["earlier"]["ppl"] == {"wikitext2": 40.0}
    assert data["zeroshot"]["0.7/final/seed0"]["export"] == str(here)
    assert "earlier" not in data["cells"]["0.5/final/seed0"]


def test_the_equal_calibration_tyr_row_is_the_search_row_where_the_defaults_are_tyrs_search(
        compare, tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """quality.py's tyr-equal row (Týr's search exported like the search) at 0.5, where the defaults of the
    day are Týr's search with that export: the search row itself, marked so, and no rival in the verdicts;
    at 0.8 (another unit order) a search of its own, read from its quality.py cell."""
    assert compare.same_search(0.5, "tyr-equal", "final") and not compare.same_search(0.8, "tyr-equal", "final")
    assert not compare.same_search(0.5, "tyr", "final")  # the first export: 64 windows
    out = tmp_path / "compare"
    rows = [(ratio, row, value) for ratio in (0.5, 0.8)
            for row, value in (("final", 40.0), ("tyr", 30.0), ("tyr-equal", 35.0)) if (ratio, row) != (0.5, "tyr-equal")]
    quality = quality_file(tmp_path / "quality.json", tiny_model_dir, rows)
    argv = ["--model", str(tiny_model_dir), "--ratios", "0.8", "0.5", "--recipes", "wanda-sp", "--windows", "1",
            "--held-out", "ptb", "--out", str(out), "--search-cells", str(quality), "final",
            "--tyr-rows", "tyr", "tyr-equal"]
    assert compare.main(argv) == 0
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    equal = "tyr (search's calibration)"
    assert cells[f"{equal}:0.5"]["same_as"] == "search:0.5"
    assert cells[f"{equal}:0.5"]["metrics"] == cells["search:0.5"]["metrics"]
    assert "same_as" not in cells[f"{equal}:0.8"]
    assert cells[f"{equal}:0.8"]["metrics"]["ptb_2048"]["ppl"] == 70.0
    report = out.with_suffix(".md").read_text()
    assert f"| {equal} | 35.00 | = search |" in report
    # at 0.5 the strongest rival on WikiText-2 is tyr (30.00), never the search's own copy (40.00)
    assert "- 0.5, wikitext2: tyr 30.00; search 40.00" in report
    assert "- 0.8, wikitext2 in windows of 128:" in report

    # the defaults change (last8: at 0.5 another search than tyr-equal's): the search row is read from the new
    # row where it has a cell and is a "–" where not; tyr-equal at 0.5 keeps the final row's cell as a row of
    # its own, with its short windows, without measuring it again (its export may be gone from this machine)
    data = json.loads(quality.read_text())
    data["cells"]["0.5/last8/seed0"] = {**data["cells"]["0.5/final/seed0"], "ppl": {"wikitext2": 38.0, "ptb": 76.0}}
    quality.write_text(json.dumps(data))
    read, quality_cell = [], compare.quality_cell
    monkeypatch.setattr(compare, "quality_cell", lambda args, ratio, row, *a: read.append((ratio, row)) or
                        quality_cell(args, ratio, row, *a))
    argv[argv.index("final")] = "last8"
    assert compare.main(argv) == 0
    assert sorted(read) == [(0.5, "last8"), (0.8, "last8")]
    again = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert "search:0.8" not in again and again["search:0.5"]["metrics"]["ptb_2048"]["ppl"] == 76.0
    assert again[f"{equal}:0.5"]["record"]["from"] == f"{quality} 0.5/final/seed0"
    assert "same_as" not in again[f"{equal}:0.5"] and again[f"{equal}:0.5"]["metrics"] == cells["search:0.5"]["metrics"]
    report = out.with_suffix(".md").read_text()
    assert f"| {equal} | 35.00 | 40.00 |" in report and "| search | pending | 38.00 |" in report
    assert "- 0.5, wikitext2: tyr 30.00; search 38.00" in report


def test_the_search_row_of_the_defaults_reads_the_row_of_its_order_and_tyr_takes_the_same_order_windows(
        compare, tiny_model_dir, tiny_data, tmp_path):
    """order-auto (the defaults since 2026-12-07: the osscar order on 256 windows at 0.6 and below) is read from
    order256 at 0.5 and last8 at 0.8; Týr's search exported like the search is read from the tyr row with the
    search's order windows there (tyr-order256 at 0.5, tyr-equal's 64 at 0.8); the first tyr row keeps its own."""
    assert compare.budget_row(0.5, "tyr-equal", "order-auto") == "tyr-order256"
    assert compare.budget_row(0.8, "tyr-equal", "order-auto") == "tyr-equal"
    assert compare.budget_row(0.5, "tyr-equal", "last8") == "tyr-equal"
    assert compare.budget_row(0.5, "tyr", "order-auto") == "tyr"
    out = tmp_path / "compare"
    rows = [(0.5, "order256", 40.0), (0.5, "last8", 41.0), (0.8, "last8", 20.0), (0.5, "tyr-order256", 42.0),
            (0.5, "tyr-equal", 43.0), (0.8, "tyr-equal", 21.0)]
    quality = quality_file(tmp_path / "quality.json", tiny_model_dir, rows)
    argv = ["--model", str(tiny_model_dir), "--ratios", "0.8", "0.5", "--recipes", "wanda-sp", "--windows", "1",
            "--held-out", "ptb", "--out", str(out), "--search-cells", str(quality), "order-auto",
            "--tyr-rows", "tyr-equal"]
    assert compare.main(argv) == 0
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    equal = "tyr (search's calibration)"
    assert [cells[f"search:{r}"]["record"]["from"] for r in (0.5, 0.8)] == [f"{quality} 0.5/order256/seed0",
                                                                           f"{quality} 0.8/last8/seed0"]
    assert [cells[f"{equal}:{r}"]["record"]["from"] for r in (0.5, 0.8)] == [f"{quality} 0.5/tyr-order256/seed0",
                                                                            f"{quality} 0.8/tyr-equal/seed0"]
    assert cells[f"{equal}:0.5"]["metrics"]["ptb_2048"]["ppl"] == 84.0


def test_quality_reuses_another_rows_search_where_only_the_export_differs(tmp_path, monkeypatch):
    """quality.py's tyr-equal cell starts from a copy of the tyr cell's run folder (the same search: only the
    export differs), without its export and result; a resumed copy still names its source, and a folder
    that holds a search of its own, or a source with another search, is never taken for it."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import quality

    source_dir = tmp_path / "0.9" / "tyr-seed0"
    (source_dir / "export").mkdir(parents=True)
    for name in ("study.journal", "config.yaml", "best.json", "report.md"):
        (source_dir / name).write_text(name)
    source = {"ratio": 0.9, "row": "tyr", "seed": 0, "options": {"trials": 260}, "seconds": {"search": 785.3},
              "export": str(source_dir / "export")}
    cells = {"0.9/tyr/seed0": source}
    config = quality.cell_config(0.9, "tyr-equal", 0)
    run_dir = tmp_path / "0.9" / "tyr-equal-seed0"
    assert quality.reused_search(config, "tyr-equal", run_dir, cells) is source
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "search_from", "study.journal"]
    assert quality.reused_search(config, "tyr-equal", run_dir, cells) is source  # resumed: the marker
    (run_dir / "search_from").unlink()
    assert quality.reused_search(config, "tyr-equal", run_dir, cells) is None  # a search of its own
    other = tmp_path / "0.9" / "other-seed0"
    assert quality.reused_search(config, "final", other, cells) is None and not other.exists()
    for changed in ({"options": {"trials": 100}}, {"row": "final"}):  # fewer trials; another unit order
        cells["0.9/tyr/seed0"] = {**source, **changed}
        assert quality.reused_search(config, "tyr-equal", other, cells) is None and not other.exists()
    # the upstream row is the kl row's search exported by the upstream least squares
    cells["0.9/kl/seed0"] = {**source, "row": "kl", "options": {"trials": 100}}
    upstream = tmp_path / "0.9" / "upstream-seed0"
    assert quality.reused_search(quality.cell_config(0.9, "upstream", 0), "upstream", upstream, cells) is not None
    assert (upstream / "search_from").read_text() == "0.9/kl/seed0"


def test_a_quality_cell_records_its_winner_so_it_can_be_exported_again(tmp_path, monkeypatch):
    """The run folders stay on the machine a search ran on: the cell keeps the winner's trial and widths."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import quality

    widths = [[3, 1, 512], [2, 1, 384]]
    best = {"best": {"trial": 7, "widths": widths, "block_ratio": 0.7, "rescored": 0.6},
            "test": {"ppl": 36.0, "windows": 32}, "held_out": {"ptb": {"ppl": 80.0}},
            "seconds": {"search": 1.0}, "unit_order": {"seconds": 3.0, "reused": True}, "export": str(tmp_path / "export")}
    monkeypatch.setattr(quality, "write_config", lambda config, row: None)  # not into the repository's configs
    finished = SimpleNamespace(best=best, completed=9)
    monkeypatch.setattr(quality, "run_search", lambda config, run_dir, progress: finished)
    monkeypatch.setattr(quality, "validation_ppl", lambda export: 78.0)
    cell = quality.search_cell(0.7, "final", 0, tmp_path, None, {})
    assert cell["widths"] == widths and cell["winner_trial"] == 7
    assert cell["ppl"] == {"wikitext2": 36.0, "ptb": 80.0, "ptb:validation": 78.0}
    assert cell["unit_order"] == {"seconds": 3.0, "reused": True}  # the report gives a cold command's time


def test_the_evopress_depth_row_searches_whole_sublayers_and_joins_the_table(compare, tiny_model_dir, zeroshot_data,
                                                                             tmp_path, monkeypatch):
    """--depth-search-trials: EvoPress's depth search runs in --runs (here with the tiny model's settings), its
    export, whole sub-layers kept or removed, is evaluated on the comparison's windows and gets a zero-shot."""
    from tests.search.test_search import tiny_config

    def tiny_depth(args, ratio):
        return tiny_config(tiny_model_dir, ratio, preset="depth", evolution="staged-tiny",
                           trials=args.depth_search_trials, eval_windows=0)

    monkeypatch.setattr(compare, "depth_search_config", tiny_depth)
    runs = tmp_path / "runs"
    cells = run(compare, tiny_model_dir, tmp_path / "compare", "--depth-search-trials", "8", "--runs", str(runs),
                "--zeroshot", "2", "--zeroshot-ratios", "0.5")["cells"]
    depth = cells["evopress-depth:0.5"]
    assert depth["record"]["run_dir"] == str(runs / "compare-evopress-depth-0.5") and depth["record"]["trials"] >= 8
    # its wall time, like every search row's, is the search's without its test evaluation
    assert "test" not in depth["record"]["seconds"] and depth["recipe_seconds"] == pytest.approx(
        sum(depth["record"]["seconds"].values()))
    assert all(math.isfinite(depth["metrics"][m]["ppl"]) for m in METRICS)
    assert all(w[:2] in ([0, 0], [2, 3]) and w[2] in (0, 96) for w in depth["widths"])
    assert 0 <= depth["zeroshot"]["scores"]["average"] <= 1
    assert "| evopress-depth | " in (tmp_path / "compare.md").read_text()


def test_the_report_puts_a_labelled_variant_under_its_recipe(compare, tmp_path):
    """A merged file's rows ("osscar (search's calibration)") follow their recipe's row, whatever the
    order of the cells, in every table."""
    import compare_report

    metrics = {"wikitext2_2048": {"ppl": 30.0}, "wikitext2_128": {"ppl": 60.0}}
    cells = {f"{name}:0.7": {"kind": "recipe", "metrics": metrics}
             for name in ("osscar", "ziplm", "tyr", "osscar (search's calibration)", "search")}
    cells["dense"] = {"metrics": metrics}
    config = {"short_seqlen": 128, "held_out": [], "windows_2048": 32, "dtype": "float32", "max_calib_tokens": None}
    compare_report.write_report({"config": config, "cells": cells}, tmp_path / "compare")
    table = (tmp_path / "compare.md").read_text().split("## Perplexity: WikiText-2, 2048 tokens")[1].split("##")[0]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["osscar", "osscar (search's calibration)", "ziplm", "tyr", "search"]


def test_the_zero_shot_verdict_gives_the_standard_error_of_the_difference(compare, tmp_path):
    """Two zero-shot averages on a few hundred questions a task differ by chance: the verdict line states the
    binomial standard error of their difference (none where a cell has only its average)."""
    import compare_report

    def scores(p: float) -> dict:
        return {"zeroshot": {"limit": 500, "scores": {"boolq": p, "piqa": p, "average": p}}}

    assert compare_report.zeroshot_standard_error(scores(0.5)) == pytest.approx(math.sqrt(2 * 0.25 / 500) / 2)
    assert compare_report.zeroshot_standard_error({"zeroshot": {"limit": 2, "scores": {"average": 0.1}}}) is None
    metrics = {"wikitext2_2048": {"ppl": 1.0}, "wikitext2_128": {"ppl": 1.0}, "ptb_2048": {"ppl": 1.0}}
    cells = {"osscar:0.5": {"kind": "recipe", "metrics": metrics, **scores(0.40)},
             "search:0.5": {"kind": "search", "metrics": metrics, **scores(0.38)}, "dense": {"metrics": metrics}}
    config = {"short_seqlen": 128, "held_out": ["ptb"], "windows_2048": 32, "dtype": "float32",
              "max_calib_tokens": None}
    compare_report.write_report({"config": config, "cells": cells}, tmp_path / "compare")
    report = (tmp_path / "compare.md").read_text()
    difference = math.hypot(compare_report.zeroshot_standard_error(scores(0.40)),
                            compare_report.zeroshot_standard_error(scores(0.38)))
    assert (f"- 0.5, zero-shot average: osscar 0.400; search 0.380, 2.0 points lower (worse) (standard error of "
            f"the difference {difference * 100:.1f} points") in report


def test_a_row_that_is_the_search_itself_has_no_seeds_row_and_no_verdict_of_its_own(compare, tmp_path):
    """Where Týr's search with the search's calibration is the search row (= search), its seeds are the
    search's: the seeds table shows them once and no verdict pits the search against itself."""
    import compare_report

    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"cells": {f"0.5/final/seed{s}": {"ppl": {"wikitext2": v, "ptb": 2 * v}}
                                             for s, v in ((0, 40.0), (1, 44.0))}}))
    metrics = {"wikitext2_2048": {"ppl": 1.0}, "wikitext2_128": {"ppl": 1.0}, "ptb_2048": {"ppl": 1.0}}
    search = {"kind": "search", "metrics": metrics, "record": {"from": f"{quality} 0.5/final/seed0"}}
    equal = "tyr (search's calibration)"
    cells = {"search:0.5": search, f"{equal}:0.5": {**search, "same_as": "search:0.5"}, "dense": {"metrics": metrics}}
    config = {"short_seqlen": 128, "held_out": ["ptb"], "windows_2048": 32, "dtype": "float32",
              "max_calib_tokens": None}
    compare_report.write_report({"config": config, "cells": cells}, tmp_path / "compare")
    report = (tmp_path / "compare.md").read_text()
    assert "| search | 0.5 | 0, 1 | 40.00 / 44.00 (mean 42.00) |" in report
    assert f"| {equal} | 0.5 | 0, 1 |" not in report
    assert "against the search" not in report
