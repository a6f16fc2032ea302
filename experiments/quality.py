"""The search-quality ablation of issue 13: the search with today's defaults, then the issue's items
added one at a time, each row a full search of SmolLM2-135M whose export is measured in float32 on the
first 32 windows of 2048 tokens of WikiText-2 test, PTB test and c4:heldout (documents 501-1000 of
the local C4 sample, which no step calibrates on).

Decisions (which item stays in the next rows, which becomes a default) are read from text no step
fitted and no test split: the re-scoring region of WikiText-2 validation (the search's own held-out
value) and PTB validation, both measured here too. Each search runs in its own folder under
``--runs`` and resumes there; finished cells are kept in the JSON.

    LLM_PRUNER_DATA=../shared/data python experiments/quality.py --ratios 0.7 0.5 --rows defaults kl
    LLM_PRUNER_DATA=../shared/data python experiments/quality.py --ratios 0.5 --rows defaults --seeds 1
    LLM_PRUNER_DATA=../shared/data python experiments/quality.py --ratios 0.5 --rows defaults --zeroshot
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from evaluators.environment import environment, matmul_tflops
from evaluators.harness import TASKS, evaluate_zeroshot
from search.cli.common import parse_args_with_config
from search.config import SEARCH_METHODS, SearchConfig
from search.job import run_search
from space.export import write_json
from space.models import load_model
from space.scores.cache import IMPORTANCE_FILE, stored_seconds

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).parent / "configs" / "quality"
EVAL = ("wikitext2", "ptb", "c4:heldout")  # the protocol's texts, 32 windows of 2048 each
VALIDATION = ("ptb:validation", 8)  # for decisions (never a test split): 8 windows of 2048

# Row 0: the search's defaults before this items (pinned, as every row measured against the defaults of
# its day: the defaults change).
BEFORE = {"fitness": "ppl", "evolution": "cpu", "export_reform": "local", "importance": "wanda-sp", "trials": 100,
          "export_nsamples": 64, "export_pass_dtype": "float32", "export_calib": "wikitext2"}
STAGED = {**BEFORE, "fitness": "kl", "export_reform": "upstream", "evolution": "staged", "trials": 260}
# The unit order on the statistics' 64 windows, as every row measured before 2026-12-07 computed it (since, the
# osscar order takes 256 by default: search/defaults.py ORDER_NSAMPLES); pinned in the rows whose order is osscar
# at some ratio (at a wanda-sp ratio it resolves to the statistics' own, as before).
ORDER_64 = {"order_nsamples": 64}
# Cumulative rows: each adds one item of the issue to the row before it (in the order built).
ROWS: dict[str, dict] = {
    "defaults": BEFORE,
    "kl": {**BEFORE, "fitness": "kl"},
    "obs": {**BEFORE, "fitness": "kl", "importance": "obs-elimination"},
    "upstream": {**BEFORE, "fitness": "kl", "export_reform": "upstream"},
    "staged": STAGED,
    "mixed": {**STAGED, "calib": "wikitext2+c4:calib"},
    # llm-pruner search --method tyr (the staged row with the osscar order), exported as it was measured
    "tyr": {**SEARCH_METHODS["tyr"], **ORDER_64, "export_nsamples": 64, "export_pass_dtype": "float32", "export_calib": "wikitext2"},
    # tyr calibrated (statistics, fitness and re-scoring regions) on WikiText-2 validation + c4:calib
    "tyr-mixed": {**SEARCH_METHODS["tyr"], **ORDER_64, "export_nsamples": 64, "export_pass_dtype": "float32",
                  "calib": "wikitext2+c4:calib", "export_calib": "wikitext2+c4:calib"},
    # tyr with the search's export of the day (what `llm-pruner search --method tyr` runs today): the same
    # calibration text and token budget as the final row's export, for compare.md's equal-calibration tyr row
    "tyr-equal": {**SEARCH_METHODS["tyr"], **ORDER_64},
    # Rows below measured against the defaults of their day pin what has changed since, so that each cell's
    # options still give the search it ran (tests/test_quality_cells.py). The defaults of 2026-12-02 to
    # 12-06, the final row (a 16-window last stage, 260 children): tyr's search at 0.5 and staged's at 0.7,
    # the winner refitted on 256 windows (calibration_size.py measured that step on their seed-0 winners);
    # its cells were exported with float32 passes on WikiText-2; the defaults since are bfloat16 passes (the
    # same to 0.03 %) and, above 0.6, C4 beside WikiText-2 with the units re-selected on both (calibration_size.md
    # measured these on its winners)
    "final": {"evolution": "staged", **ORDER_64},
    # the final row with twice the children (about 33 generations instead of 17): is the search short of
    # generations, or is what it finds already as good as its fitness can tell?
    "long": {"evolution": "staged", "trials": 520, **ORDER_64},
    # the final row with switches across kinds (attention shapes traded for MLP channels), so
    # that the split between attention and MLP is searched, not fixed by the start generation 0 keeps
    "across": {"evolution": "staged-across", **ORDER_64},
    # the final row with the fitness's least squares on the statistics of the model pruned like the first
    # start (--fitness-statistics upstream)
    "fitstats": {"evolution": "staged", "fitness_statistics": "upstream", "export_pass_dtype": "float32",
                 "export_calib": "wikitext2", **ORDER_64},
    # the final row with an 8-window last stage and the children that make as many window evaluations as
    # its 260 (22 generations of 48 instead of 17 of 64); the fitness pool and the finalists' re-scoring
    # windows kept at the final row's 84 and 64. The defaults of 2026-12-06 to 12-07, and today's above 0.6 (where
    # the order is wanda-sp, on the statistics' windows)
    "last8": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64, **ORDER_64},
    # last8 whose last stage also scores the second stage's two best children combined (a generation may take
    # two children's switches), with the children that make about as many window evaluations (292)
    "combine": {"evolution": "staged-8-combine", "trials": 292, "fitness_nsamples": 84, "final_nsamples": 64,
                **ORDER_64},
    # last8 whose own statistics (the unit order, the fitness's least squares) come from 256 windows, the export's
    # count, instead of 64: at 0.6 and 0.5 the seed-1 cells of last8 and of the final row both lose 2-6 % to
    # seed 0, and the two rows share each seed's statistics windows
    "stats256": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                 "nsamples": 256},
    # stats256 apart: the unit order on 256 windows, the fitness's least squares on last8's 64 (stats256 won every
    # text at 0.6 but lost held-out C4 at 0.5: which of the two statistics does what). Today's defaults at 0.6 and
    # below since 2026-12-07 (search/defaults.py ORDER_NSAMPLES)
    "order256": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                 "order_nsamples": 256},
    # order256 with twice the children (680): whether the search at 0.5 is short of children now that the order
    # is on 256 windows (`long` bought 1-2 % with the 64-window order, at twice the loop's time)
    "order256-long": {"evolution": "staged-8", "trials": 680, "fitness_nsamples": 84, "final_nsamples": 64,
                      "order_nsamples": 256},
    # order256 on seed 0's windows (the order's, the statistics', the fitness's and the re-scoring's) with the
    # cell's seed for the sampler alone: how much of the seeds' spread at 0.5 is the evolution's own draws
    "order256-data0": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                       "order_nsamples": 256, "data_seed": 0},
    # the same on seed 2's windows (seed 2 of order256 lost PTB validation by 8 % to seed 0): sampler seed 0 on
    # seed 2's windows against sampler seed 0 on seed 0's, the windows apart
    "order256-data2": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                       "order_nsamples": 256, "data_seed": 2},
    # order256 with the unit order's 256 windows drawn with seed 2, the rest of the windows the cell's (run at seed
    # 0), and the reverse (seed 0's order, run at seed 2): whether the unit order's windows or the others (the
    # statistics', the fitness pool, the re-scoring) carry seed 2's loss at 0.5
    "order256-orderseed2": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                            "order_nsamples": 256, "order_seed": 2},
    "order256-orderseed0": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                            "order_nsamples": 256, "order_seed": 0},
    # order256 with the order's 256 windows evenly spaced over the statistics' region instead of drawn (81 % of its
    # 314 windows' worth of tokens, no window overlapping another): one order for every seed
    "order256-even": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                      "order_nsamples": 256, "order_seed": "even"},
    # order256 with the order's 256 windows shared between WikiText-2 and c4:calib (128 each, the statistics'
    # region and seed of each), the search, its least squares and the export on WikiText-2 as before: at 0.5 the
    # order's windows move the winner most (order256-orderseed*), and an order fitted to one text keeps the units
    # that text needs (C4 is the text the 0.5 targets miss most)
    "order256-mixed": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64,
                       "order_nsamples": 256, "order_calib": "wikitext2+c4:calib"},
    # order256 whose generations draw from 168 fitness windows instead of 84 (each window of the pool then serves
    # about 1.8 generations' stages instead of 3.6; the per-generation work is the same): at 0.5 the windows' draws,
    # not the sampler, move the winner (order256-data0 / -data2), and the fitness pool is the draw the search
    # re-uses most
    "order256-pool168": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 168, "final_nsamples": 64,
                         "order_nsamples": 256},
    # Týr's search (tyr-equal's) with order256's unit order on 256 windows: what `--method tyr` runs since
    # 2026-12-07 (every osscar order takes them), the equal-budget tyr row where the search row is order256
    "tyr-order256": {**SEARCH_METHODS["tyr"], "order_nsamples": 256},
    # last8 with the order's windows left to the default (search/defaults.py ORDER_NSAMPLES): the defaults since
    # 2026-12-07, order256 at 0.6 and below, last8 above; compare.md's search row, read from the row of the
    # same search at each ratio (not run itself)
    "order-auto": {"evolution": "staged-8", "trials": 340, "fitness_nsamples": 84, "final_nsamples": 64},
}

# Rows whose search is another row's (they differ in runtime fields only, e.g. the export): the other row's
# finished run folder is copied, the winner re-scored and exported again, the search's seconds are that row's.
SEARCH_FROM = {"tyr-equal": "tyr", "upstream": "kl"}


# Every cell scores and exports in bfloat16, as measured (on AVX-512 CPUs, where the defaults' ``auto`` is
# bfloat16; an AVX2 CPU would resolve it to float32, another search); a row may pin its own export passes.
# ``--dtype float32`` runs new cells in float32 instead (2.4x faster a candidate on an AVX2 CPU), recorded
# in their options.
MEASURED_DTYPE = "bfloat16"
MEASURED_DTYPES = {"dtype": MEASURED_DTYPE, "export_pass_dtype": MEASURED_DTYPE}


def cell_options(row: str | None, trials: int | None, dtype: str = MEASURED_DTYPE) -> dict:
    """A row's options (``None``: none, today's defaults) in ``dtype``."""
    return {"dtype": dtype, "export_pass_dtype": dtype, **({"trials": trials} if trials else {}),
            **(ROWS[row] if row else {})}


def cell_config(ratio: float, row: str | None, seed: int, trials: int | None = None,
                dtype: str = MEASURED_DTYPE) -> SearchConfig:
    """The search of one cell (``experiments/configs/quality/`` holds each as the YAML a run folder
    records: ``llm-pruner search --config FILE --run-dir DIR`` runs it again)."""
    return SearchConfig.create("smollm2-135m", ratio, seed=seed, eval_windows=32, eval_datasets=EVAL,
                               **cell_options(row, trials, dtype))


def cell_dtype(cell: dict) -> str:
    """The dtype a measured cell scored in (cells older than the dtype option were bfloat16)."""
    return cell["options"].get("dtype", MEASURED_DTYPE)


def measured_config(cell: dict) -> SearchConfig:
    """The search a measured cell ran."""
    return cell_config(cell["ratio"], cell["row"], cell["seed"], cell["options"].get("trials"), cell_dtype(cell))


def is_default(cell: dict) -> bool:
    """Whether a cell's search is the one today's defaults run (whatever its row's name; its export may
    differ: a runtime field)."""
    today = cell_config(cell["ratio"], None, cell["seed"], dtype=cell_dtype(cell))
    measured = measured_config(cell)
    # trials is a runtime field (a search resumes with more), but a longer search is not the defaults'
    return measured.identity() == today.identity() and measured.trials == today.trials


def write_config(config: SearchConfig, row: str) -> None:
    path = CONFIGS / f"{config.ratio}-{row}-seed{config.seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def search_cell(ratio: float, row: str, seed: int, runs: Path, trials: int | None, cells: dict,
                dtype: str = MEASURED_DTYPE) -> dict:
    config = cell_config(ratio, row, seed, trials, dtype)
    options = {**cell_options(row, trials, dtype), "trials": config.trials}
    write_config(config, row)
    run_dir = runs / f"{ratio}" / f"{row}-seed{seed}"
    source = reused_search(config, row, run_dir, cells)
    result = run_search(config, run_dir, progress=False)
    best = result.best
    ppl = {spec: t["ppl"] for spec, t in [("wikitext2", best["test"]), *best["held_out"].items()]}
    if VALIDATION[0] not in ppl:
        ppl[VALIDATION[0]] = validation_ppl(best["export"])
    seconds = {k: round(v, 1) for k, v in best["seconds"].items()}
    unit_order = best.get("unit_order")  # absent from run folders finished before the search recorded it
    if source is not None:  # the order and the trial loop ran in the source row's cell
        seconds.update({k: source["seconds"][k] for k in ("prepare", "search") if k in source["seconds"]})
        unit_order = source.get("unit_order")
    return {"ratio": ratio, "row": row, "seed": seed, "options": options, "trials": result.completed,
            "block_ratio": best["best"]["block_ratio"], "rescored": best["best"]["rescored"],
            # the winner itself (as compare.py's cells record it), exportable again without its run folder
            "winner_trial": best["best"]["trial"], "widths": best["best"]["widths"],
            "fitness": config.fitness_name, "ppl": ppl, "windows": best["test"]["windows"], "seconds": seconds,
            **({"unit_order": unit_order} if unit_order else {}), "export": best["export"],
            **({"search_from": f"{ratio}/{source['row']}/seed{seed}"} if source else {})}


def reused_search(config: SearchConfig, row: str, run_dir: Path, cells: dict) -> dict | None:
    """The cell of the row whose search ``row`` reuses (``SEARCH_FROM``): where that cell ran here with
    the same search and ``run_dir`` does not exist yet, its run folder is copied there without its export
    and result (a marker names the source, so a resumed copy still reports the source's search); None
    where ``run_dir`` holds a search of its own (it runs whole)."""
    key = f"{config.ratio}/{SEARCH_FROM.get(row)}/seed{config.seed}"
    marker = run_dir / "search_from"
    if run_dir.exists():
        return cells.get(marker.read_text()) if marker.is_file() else None
    source = cells.get(key)
    if source is None:
        return None
    source_dir = Path(source["export"]).parent
    source_config = measured_config(source)
    same = source_config.identity() == config.identity() and source["options"].get("trials") == config.trials
    if not same or not (source_dir / "study.journal").is_file():
        return None
    partial = run_dir.with_name(run_dir.name + ".copying")  # an interrupted copy never looks like a run folder
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source_dir, partial, ignore=shutil.ignore_patterns("export", "best.json", "report.md", "*.png"))
    (partial / marker.name).write_text(key)
    partial.rename(run_dir)
    return source


def prepare_from_run_folder(cell: dict) -> float | None:
    """The seconds a cell's search spent before its trials, for a cell measured before the search timed
    them: from its run folder's file times (config.yaml written at the start, study.json as the trials
    begin), where that folder is on this machine and ran once (a resumed run rewrites config.yaml; a copied
    search's preparation was its source's); None where they do not tell."""
    run_dir = Path(cell["export"]).parent
    config, study = run_dir / "config.yaml", run_dir / "study.json"
    if "search_from" in cell or not (config.is_file() and study.is_file()):
        return None
    seconds = study.stat().st_mtime - config.stat().st_mtime
    return round(seconds, 1) if seconds > 0 else None


def fill_prepare_seconds(cells: dict) -> bool:
    """Give each cell measured before the search timed its preparation the seconds its run folder tells,
    marked as read from file times; whether any cell changed."""
    changed = False
    for cell in cells.values():
        if "prepare" not in cell["seconds"] and "prepare_from" not in cell:
            seconds = prepare_from_run_folder(cell)
            cell["prepare_from"] = "run folder file times" if seconds is not None else "not recorded"
            if seconds is not None:
                cell["seconds"]["prepare"] = seconds
            changed = True
    return changed


def fill_unit_order(cells: dict) -> bool:
    """Mark each cell measured before the search recorded its unit order whose preparation took less than its
    run folder's order took to compute (``importance.pt`` keeps those seconds): that order was read from the
    score cache. Cells whose folder is not here, or whose preparation could have computed it, stay unmarked;
    whether any cell changed."""
    changed = False
    for cell in cells.values():
        path = Path(cell["export"]).parent / IMPORTANCE_FILE
        if "unit_order" in cell or "search_from" in cell or "prepare" not in cell["seconds"] or not path.is_file():
            continue
        seconds = stored_seconds(path)
        if cell["seconds"]["prepare"] < seconds:
            cell["unit_order"] = {"seconds": round(seconds, 1), "reused": True,
                                  "from": "inferred: the preparation took less than the order"}
            changed = True
    return changed


def prepare_text(cell: dict) -> str:
    """The table's preparation seconds of ``cell``, with what its unit order took where it was read from the
    score cache (a cold command spends that too)."""
    seconds = cell["seconds"]
    text = f"{seconds['prepare']:.0f}" if "prepare" in seconds else "–"
    if cell.get("unit_order", {}).get("reused"):
        text += f" (order cached: {cell['unit_order']['seconds']:.0f})"
    return text


def validation_ppl(export: str) -> float:
    from evaluators.suite import evaluate

    loaded = load_model(export, dtype=torch.float32, trust_remote_code=True)  # our own exports, any commit's
    return evaluate(loaded.model, loaded.tokenizer, ppl=[VALIDATION[0]], seqlen=2048, limit=VALIDATION[1])["ppl"][
        VALIDATION[0]]


def zeroshot_cell(export: str, limit: int) -> dict:
    loaded = load_model(export, dtype=torch.float32, trust_remote_code=True)  # our own exports, any commit's
    return zeroshot_scores(loaded.model, loaded.tokenizer, limit)


def zeroshot_scores(model, tokenizer, limit: int) -> dict:
    """The seven tasks' headline scores on their first ``limit`` questions, their average, the seconds."""
    started = time.time()
    result = evaluate_zeroshot(model, tokenizer, list(TASKS), limit=limit)
    scores = {name: r[r["metric"]] for name, r in result["zeroshot"].items()}
    return {"limit": limit, "scores": {**scores, "average": result["zeroshot_avg"]},
            "seconds": round(time.time() - started, 1)}


def dense_ppl() -> dict:
    from evaluators.suite import evaluate

    loaded = load_model("smollm2-135m", dtype=torch.float32)
    return evaluate(loaded.model, loaded.tokenizer, ppl=list(EVAL), seqlen=2048, limit=32)["ppl"]


def report(data: dict) -> str:
    lines = ["# Search quality, item by item (SmolLM2-135M)", "",
             "Each row is a whole search (`llm-pruner search` with the row's options; row 0, `defaults`, is the search's "
             "defaults before issue 13's items; each cell's whole config is in experiments/configs/quality/) whose export "
             "is measured in float32 on the first 32 windows of 2048 tokens: WikiText-2 test, PTB test and "
             "c4:heldout (C4 documents 501-1000, never calibrated on). Decisions use the re-scoring region of "
             "WikiText-2 validation (`rescored`, the search's own held-out fitness, comparable within a fitness "
             "kind) and PTB validation (32 windows in the first cells, 8 after), never a test split. Dense: "
             + ", ".join(f"{k} {v:.2f}" for k, v in data.get("dense", {}).items()) + ".", "",
             f"Machine: {data['environment']['machine']['cpu']}, {data['environment']['machine']['threads']} threads; "
             "`bf16` is the bfloat16 matmul peak (up to 2048², TFLOP/s) measured in the same run as the cell.", "",
             "A `*` after the row marks the search today's defaults run at that ratio (since 2026-12-07 the `order256` "
             "row at 0.6 and below, `last8` above; `last8` is the defaults of 2026-12-06 to 12-07, the `final` row "
             "those of 2026-12-02 to 12-06; all refit the winner on 256 windows, not 64: calibration_size.md).", "",
             "Wall time (seconds; the test evaluation not counted): the preparation (the model's load, the unit "
             "order, the fitness statistics: timed by the search since 2026-12-06, read from the run folder's file "
             "times for the earlier cells whose folder is on this machine, – where neither; a unit order already "
             "in the score cache, the same model, order windows and seed, is read, not computed: `order cached: s` "
             "gives what it took to compute, which a cold command spends too), then the "
             "search, the re-scoring of its finalists and the export's least squares.", "",
             "| ratio | row | options | seed | WikiText-2 | PTB | c4:heldout | PTB valid | re-scored | "
             "prepare s | search + re-score + export s | bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(data["cells"], key=lambda k: (-data["cells"][k]["ratio"], list(ROWS).index(data["cells"][k]["row"]),
                                                    data["cells"][k]["seed"])):
        c = data["cells"][key]
        p = c["ppl"]
        t = c["seconds"]
        wall = " + ".join(f"{t[k]:.0f}" for k in ("search", "rescore", "export") if k in t)
        options = cell_options(c["row"], c["options"].get("trials"), cell_dtype(c))
        lines.append(f"| {c['ratio']} | {c['row']}{' *' if is_default(c) else ''} | "
                     f"{'today' + chr(39) + 's defaults ' if is_default(c) else ''}`{json.dumps(options)}` | "
                     f"{c['seed']} | "
                     f"{p['wikitext2']:.2f} | {p['ptb']:.2f} | {p['c4:heldout']:.2f} | {p['ptb:validation']:.2f} | "
                     f"{c['rescored']:.4g} | {prepare_text(c)} | {wall} | {c.get('bf16_tflops', float('nan')):.2f} |")
    if data.get("zeroshot"):
        lines += ["", "Zero-shot accuracy (seven tasks, first 500 each, float32):", "",
                  "| cell | " + " | ".join(TASKS) + " | average |", "|---|" + "---|" * (len(TASKS) + 1)]
        for key, z in sorted(data["zeroshot"].items()):
            s = z["scores"]
            lines.append(f"| {key} | " + " | ".join(f"{s[t]:.3f}" for t in TASKS) + f" | {s['average']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--trials", type=int, help="trials of a row that does not set its own (default: the search's)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=MEASURED_DTYPE,
                        help="scoring and export passes of new cells (bfloat16, as the cells were measured)")
    parser.add_argument("--zeroshot", action="store_true", help="also the zero-shot average of these cells")
    parser.add_argument("--zeroshot-limit", type=int, default=500)
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--report", action="store_true", help="only write the table of the cells measured so far")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"cells": {}, "zeroshot": {}}
    if fill_prepare_seconds(data["cells"]) | fill_unit_order(data["cells"]):
        write_json(args.out, data)
    if args.report:  # the table, and the config of every cell measured so far
        for cell in data["cells"].values():
            write_config(measured_config(cell), cell["row"])
        args.out.with_suffix(".md").write_text(report(data))
        return 0
    data["environment"] = environment()
    if "dense" not in data:
        data["dense"] = dense_ppl()
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    data["command"] = "python experiments/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for ratio in args.ratios:
        for row in args.rows:
            for seed in args.seeds:
                key = f"{ratio}/{row}/seed{seed}"
                earlier = data["cells"].get(key)
                # a zero-shot is measured on the export: a cell whose export is not on this machine (run
                # folders stay where they ran) runs again, its earlier numbers kept beside the new ones
                rerun = earlier is not None and args.zeroshot and not Path(earlier["export"]).is_dir()
                if earlier is None or rerun:  # the machine's matmul peak, measured in the same run as the cell
                    cell = search_cell(ratio, row, seed, args.runs, args.trials, data["cells"], args.dtype)
                    data["cells"][key] = {**cell, **peak}
                    if rerun:  # its zero-shot, if any, was measured on the earlier export
                        data["zeroshot"].pop(key, None)
                        data["cells"][key]["earlier"] = {k: earlier[k] for k in ("ppl", "seconds", "bf16_tflops")
                                                         if k in earlier}
                    write_json(args.out, data)
                export = data["cells"][key]["export"]
                # missing, or measured on an export the cell no longer has (each entry records its export)
                if args.zeroshot and data["zeroshot"].get(key, {}).get("export") != export:
                    data["zeroshot"][key] = {**zeroshot_cell(export, args.zeroshot_limit), "export": export}
                    write_json(args.out, data)
                print(json.dumps(data["cells"][key]["ppl"]), key, flush=True)
    args.out.with_suffix(".md").write_text(report(data))
    print(report(data))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # each run's search.log gets the INFO lines, not stderr
    sys.exit(main())
