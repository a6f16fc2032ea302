"""Every recipe of search/oneshot/recipes.py, and the engine's search, side by side at several budgets.

    LLM_PRUNER_DATA=../shared/data nohup .venv/bin/python experiments/compare.py \\
        > runs/compare.log 2>&1 &

Per recipe and ratio: the recipe runs on a fresh copy of the dense model (float32), the pruned
model is cast to ``--dtype`` and evaluated in process through ``subnet_view(adapter, subnet,
overrides)`` (equal to the reloaded export: tests/test_recipes.py, tests/test_reform.py) on the
protocol's texts (PROTOCOL.md): WikiText-2 test, the first ``--windows`` windows of 2048 tokens and
the same tokens cut into windows of 128, and as many windows of 2048 of each ``--held-out`` text
(PTB test, and c4:heldout: C4 documents no step calibrates on). ``--lstsq-rows`` adds, for every
recipe without compensation of its own, a row "<recipe> + lstsq" with the search's least squares
(local, on the search's statistics windows), so that allocation and compensation compare apart. Scores that do not depend on the ratio are computed once per recipe and reused
(the wall time of every cell still counts them); cells run ratio by ratio. ``--max-calib-tokens`` caps each recipe's
calibration windows (the papers' counts are far beyond a shared 2-core CPU); ``--calib-as-search``
gives every recipe, at each ratio, the windows the search's export fits its least squares on with the
defaults of the day (text and count: WikiText-2 with C4's calibration half above 0.6, 256 x 512), for
its scores and its compensation alike, so that every row has the same calibration source and token
budget (rows labelled " (search's calibration)" unless ``--label`` says otherwise). The JSON records
what each cell used.

The search row comes from ``--search-cells``: the cells of experiments/quality.py (the same texts,
windows and dtype; a row of its table, ``defaults`` being the defaults of the day), or else from
run folders ``runs/search-<searcher>-<ratio>/`` (their export, evaluated here on the same windows);
where neither exists and ``--search-trials`` is given, :func:`search.job.run_search` runs with that
budget; otherwise the row says pending. ``--tyr-rows`` adds Týr's search (``search --method tyr``) from
the same file's rows: ``tyr`` exported as first measured (64 windows of WikiText-2), ``tyr-equal`` with
the search's export of the day (the same calibration text and token budget as the search row, the unit
order's windows included: read from the tyr row with the search row's order windows, :func:`budget_row`);
where the search row is Týr's search and export (the final row at ratio <= 0.6) that row is the search
row itself, shown as ``= search`` and never counted as its rival.

Writes ``experiments/results/compare.json`` after every cell (config, versions, seed, wall
times), then ``compare.md`` and ``compare.png``. Re-running resumes: finished cells are kept.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import dataset_windows  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from evaluators.perplexity import perplexity  # noqa: E402
from experiments.quality import MEASURED_DTYPES, ROWS, cell_config, zeroshot_cell, zeroshot_scores  # noqa: E402
from reform.spec import ReformSpec  # noqa: E402
from search.cli import common  # noqa: E402
from search.oneshot import RECIPES, OneShotCache, dense_copy, run_recipe  # noqa: E402
from search.oneshot.recipes import SEARCH_STATISTICS  # noqa: E402
from space.errors import UserError  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.views import subnet_view  # noqa: E402

log = logging.getLogger("compare")
ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# quality.py's tyr rows by their name here: ``tyr`` exported as first measured (64 windows of WikiText-2),
# ``tyr-equal`` with the search's export of the day and its unit order's windows (:func:`budget_row`)
TYR_ROWS = {"tyr": "tyr", "tyr-equal": "tyr (search's calibration)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--windows", type=int, default=32, help="first N WikiText-2 test windows of 2048 tokens")
    p.add_argument("--short-seqlen", type=int, default=128, help="the same tokens in windows of this length too")
    p.add_argument("--held-out", nargs="*", default=["ptb", "c4:heldout"],
                   help="texts evaluated in windows of 2048 beside WikiText-2 (as many windows)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="evaluation dtype")
    p.add_argument("--lstsq-rows", action="store_true",
                   help="also '<recipe> + lstsq' for every recipe without compensation of its own")
    p.add_argument("--depth-search-trials", type=int,
                   help="also the row evopress-depth: EvoPress's search over which attention / MLP sub-layers to "
                        "drop (search --preset depth --evolution staged --fitness kl), this many trials per ratio, "
                        "in <runs>/compare-evopress-depth-<ratio>")
    p.add_argument("--search-cells", nargs=2, metavar=("QUALITY_JSON", "ROW"),
                   help="the search row from experiments/quality.py's cells of this row (seed 0)")
    p.add_argument("--tyr-rows", nargs="+", default=[], metavar="ROW",
                   help="with --search-cells: tyr rows (search --method tyr) from that file's cells of these rows "
                        f"(named {', '.join(f'{k!r} {v!r}' for k, v in TYR_ROWS.items())}; others 'tyr (ROW)')")
    p.add_argument("--max-calib-tokens", type=int, default=None,
                   help="cap each recipe's calibration at this many tokens (fewer windows of its length)")
    p.add_argument("--calib-as-search", action="store_true",
                   help="every recipe calibrates (scores and compensation) on the windows the search's export "
                        "fits on at that ratio with the defaults of the day: the same text and token budget")
    p.add_argument("--runs", type=Path, default=ROOT / "runs",
                   help="where the searches this script runs or reads keep their run folders")
    p.add_argument("--searcher", default="evolution", help="the search runs to read: <runs>/search-<searcher>-<ratio>")
    p.add_argument("--search-trials", type=int, help="run the search with this many trials where no run exists")
    p.add_argument("--label", default="", help="appended to the recipes' row names (a variant run with its own --out)")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="other comparison JSONs (variant runs) whose recipe rows join this report")
    p.add_argument("--zeroshot", type=int, metavar="LIMIT",
                   help="also the zero-shot average (seven tasks, first LIMIT questions each) of every row and "
                        "the dense model at --zeroshot-ratios; a recipe cell measured without it runs again")
    p.add_argument("--zeroshot-ratios", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--report", action="store_true",
                   help="only write the report (and the plot) from the JSON of --out; nothing is measured")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "compare")
    args = common.parse_args_with_config(p, argv)
    if args.calib_as_search and args.max_calib_tokens is not None:
        p.error("--calib-as-search and --max-calib-tokens: each sets the recipes' calibration; give one")
    if args.calib_as_search and not args.label:
        args.label = " (search's calibration)"
    return args


def with_lstsq(recipe):
    """The recipe with the search's least squares as its compensation (local mode, on the
    search's statistics windows)."""
    return dataclasses.replace(recipe, name=f"{recipe.name} + lstsq", reform=ReformSpec("lstsq", "local"),
                               reform_calibration=SEARCH_STATISTICS)


def planned(args) -> list:
    """The recipes of the comparison, with the '+ lstsq' variants after their recipe."""
    recipes = []
    for name in args.recipes:
        recipe = capped(RECIPES[name], args.max_calib_tokens)
        recipes.append(recipe)
        if args.lstsq_rows and recipe.reform.method == "none":
            recipes.append(with_lstsq(recipe))
    return recipes


def at_ratio(args, recipe, ratio: float):
    """The recipe as it runs at ``ratio``: with ``--calib-as-search``, on the search's export windows
    there (for its scores and its compensation)."""
    if not args.calib_as_search:
        return recipe
    from search.config import SearchConfig

    windows = SearchConfig.create(args.model, ratio).export_calibration_spec()
    return dataclasses.replace(recipe, calibration=windows,
                               reform_calibration=windows if recipe.reform_calibration else None)


def capped(recipe, max_tokens: int | None):
    if max_tokens is None:
        return recipe
    cal = recipe.calibration
    return recipe.with_calibration(nsamples=max(1, min(cal.nsamples, max_tokens // cal.seqlen)))


def evaluate(model, windows: dict[str, torch.Tensor]) -> dict:
    out = {}
    for name, w in windows.items():
        started = time.time()
        out[name] = {"ppl": perplexity(model, w, batch_size=1 if w.shape[1] > 512 else 16),
                     "seconds": round(time.time() - started, 1)}
    return out


def load_results(path: Path, config: dict) -> dict:
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("config") != config:
            raise UserError(f"{path} holds another comparison (config differs); use another --out")
        return results
    return {"config": config, "cells": {}}


def recipe_cell(pristine, recipe, ratio: float, windows, dtype, cache, batch_size, zeroshot: int | None) -> dict:
    """The recipe run on a fresh dense copy, its pruned model evaluated on ``windows`` (and, with
    ``zeroshot``, on the seven tasks' first ``zeroshot`` questions)."""
    loaded = dense_copy(pristine)
    pruned = run_recipe(loaded, recipe, ratio=ratio, cache=cache, batch_size=batch_size)
    loaded.model.to(dtype)
    overrides = {k: v.to(dtype) for k, v in pruned.overrides.items()}
    with subnet_view(pruned.adapter, pruned.subnet, overrides):
        metrics = evaluate(loaded.model, windows)
        scores = {"zeroshot": zeroshot_scores(loaded.model, loaded.tokenizer, zeroshot)} if zeroshot else {}
    record = {k: v for k, v in pruned.record.items() if k != "environment"}
    return {"kind": "recipe", "ratio": ratio, "block_ratio": pruned.subnet.ratio(),
            "total_ratio": pruned.subnet.total_ratio(), "metrics": metrics,
            "widths": [[w.kv_heads, w.q_per_kv, w.channels] for w in pruned.subnet.layers],
            "recipe_seconds": record["seconds"]["total"], "record": record, **scores}


def quality_source(path: str, ratio: float, row: str) -> str | None:
    """Where a row of this table is read from at ``ratio``: ``"<quality.json> <key>"`` of the seed-0 cell of
    ``row`` in that file, else of a row that runs the same search and export there (tyr-equal below 0.7 is
    the final row: the defaults of 2026-12-02 to 12-06 were Týr's search there); None if neither ran."""
    cells = json.loads(Path(path).read_text())["cells"]
    for name in [row, *(r for r in ROWS if r != row and same_search(ratio, row, r))]:
        if f"{ratio}/{name}/seed0" in cells:
            return f"{path} {ratio}/{name}/seed0"
    return None


def quality_cell(args, ratio: float, row: str, windows: dict, dtype) -> dict | None:
    """A search row from experiments/quality.py's cell of ``row`` at ``ratio`` (``quality_source``) in the
    file of ``--search-cells`` (measured on the same texts and windows, in float32); the short windows,
    which quality.py does not measure, evaluated here on its export."""
    source = quality_source(args.search_cells[0], ratio, row)
    if source is None:
        return None
    path, _, key = source.rpartition(" ")
    cell = json.loads(Path(path).read_text())["cells"][key]
    metrics = {f"{name}_2048": {"ppl": cell["ppl"][name]} for name in ["wikitext2", *args.held_out]}
    short = f"wikitext2_{args.short_seqlen}"
    exported = load_model(cell["export"], dtype=dtype, trust_remote_code=True)
    metrics[short] = evaluate(exported.model, {short: windows[short]})[short]
    seconds, total = search_seconds(cell["seconds"], cell.get("unit_order"))
    return {"kind": "search", "ratio": ratio, "block_ratio": cell["block_ratio"], "metrics": metrics,
            "recipe_seconds": total,
            "record": {"from": source, "options": cell["options"], "trials": cell["trials"],
                       "seconds": seconds, "bf16_tflops": cell.get("bf16_tflops"), "export": cell["export"]}}


def search_seconds(seconds: dict, unit_order: dict | None) -> tuple[dict, float | None]:
    """A search's seconds (best.json's or a quality.py cell's) without its test evaluation, and their sum (None
    where none were recorded; a lower bound where its preparation was not: the report marks it). A unit order
    its preparation read from the score cache counts with what it took to compute (``order_cached``), as the
    recipes' cached scores do: the wall time of a cold command."""
    kept = {k: v for k, v in seconds.items() if k != "test"}
    if kept and unit_order and unit_order["reused"]:
        kept["order_cached"] = unit_order["seconds"]
    return kept, sum(kept.values()) if kept else None


def refresh_seconds(path: str, cell: dict) -> None:
    """A finished row read from quality.json takes that cell's seconds as they stand now (the preparation was
    added to cells measured before it was timed), nothing measured again."""
    measured = json.loads(Path(path).read_text())["cells"].get(cell["record"]["from"].rpartition(" ")[2])
    if measured is not None:
        cell["record"]["seconds"], cell["recipe_seconds"] = search_seconds(measured["seconds"],
                                                                           measured.get("unit_order"))


def short_windows_of_seeds(cell: dict, windows: dict, dtype, short: str) -> bool:
    """The short windows of the other seeds' exports of a row read from quality.py (which measures only
    windows of 2048), where their exports are on this machine; each kept with the seed's WikiText-2
    perplexity, so that a seed measured again is evaluated again. Whether any was measured."""
    from compare_report import seed_cells

    done = cell.get("short_by_seed", {})
    added = False
    for seed, quality in seed_cells(cell).items():
        kept = done.get(str(seed), {})
        if seed == 0 or kept.get("wikitext2_2048") == quality["ppl"]["wikitext2"] or not Path(quality["export"]).is_dir():
            continue
        exported = load_model(quality["export"], dtype=dtype, trust_remote_code=True)
        done[str(seed)] = {"wikitext2_2048": quality["ppl"]["wikitext2"],
                           short: evaluate(exported.model, {short: windows[short]})[short]}
        cell["short_by_seed"] = done  # only on rows with another seed
        added = True
    return added


def tyr_row_name(row: str) -> str:
    return TYR_ROWS.get(row, f"tyr ({row})")


def budget_row(ratio: float, row: str, search_row: str) -> str:
    """The quality.py row that stands for ``row`` at ``ratio``: among the rows with ``row``'s options but for the
    unit order's windows, the one whose order takes as many windows as ``search_row``'s there (tyr-equal, Týr's
    search with 64, is tyr-order256 where the search orders on 256: an equal budget); ``row`` where none does."""
    def order_windows(name: str) -> int:
        return cell_config(ratio, name, 0).order_calibration_spec().nsamples

    def options(name: str) -> dict:
        return {k: v for k, v in ROWS[name].items() if k != "order_nsamples"}

    if row not in ROWS or search_row not in ROWS:
        return row
    wanted = order_windows(search_row)
    return next((r for r in ROWS if options(r) == options(row) and order_windows(r) == wanted), row)


def same_search(ratio: float, row: str, search_row: str) -> bool:
    """Whether quality.py's ``row`` runs, at ``ratio``, exactly the search and export of ``search_row``."""
    return (row in ROWS and search_row in ROWS
            and cell_config(ratio, row, 0).to_dict() == cell_config(ratio, search_row, 0).to_dict())


def quality_changed(path: str, cell: dict) -> bool:
    """Whether the quality.json cell a search row was read from now holds other perplexities or another
    export (it ran again, e.g. for a zero-shot on a machine without its export)."""
    key = cell["record"]["from"].rpartition(" ")[2]
    measured = json.loads(Path(path).read_text())["cells"].get(key)
    return measured is not None and (
        cell["record"].get("export", measured["export"]) != measured["export"]
        or any(cell["metrics"][f"{name}_2048"]["ppl"] != measured["ppl"].get(name)
               for name in measured["ppl"] if f"{name}_2048" in cell["metrics"]))


def search_zeroshot(cell: dict, limit: int) -> dict:
    """A search row's zero-shot scores: quality.py's own where it measured them with this limit on this
    export, else measured here on the export (float32). A record without its export path gets it; a row
    that did not come from quality.py (the depth search) is measured on its own export."""
    if "from" not in cell["record"]:
        return zeroshot_cell(cell["record"]["export"], limit)
    source, _, key = cell["record"]["from"].rpartition(" ")
    quality = json.loads(Path(source).read_text())
    # a row read before records kept their export: the quality.json cell's (the same run: quality_changed)
    export = cell["record"].setdefault("export", quality["cells"][key]["export"])
    measured = quality.get("zeroshot", {}).get(key, {})
    if measured.get("export") == export and measured.get("limit") == limit:
        return measured
    if not Path(export).is_dir():
        raise UserError(f"{key}: its export {export} is not on this machine and {source} has no zero-shot "
                        f"of it; run experiments/quality.py for that cell with --zeroshot first")
    return zeroshot_cell(export, limit)


def depth_search_config(args, ratio: float):
    """EvoPress's depth search at ``ratio``: whole attention / MLP sub-layers, staged evolution, KL fitness."""
    from search.config import SearchConfig

    return SearchConfig.create(args.model, ratio, preset="depth", evolution="staged", fitness="kl",
                               trials=args.depth_search_trials, eval_windows=0,
                               **MEASURED_DTYPES)  # as its cells were measured, on any CPU


def depth_search_cell(args, ratio: float, windows, dtype) -> dict:
    """The depth search (resumed in ``--runs``/compare-evopress-depth-<ratio>), its export evaluated on
    the comparison's windows."""
    from search.job import run_search

    config = depth_search_config(args, ratio)
    run_dir = args.runs / f"compare-evopress-depth-{ratio}"
    result = run_search(config, run_dir, progress=False)
    exported = load_model(result.best["export"], dtype=dtype, trust_remote_code=True)  # our export, any widths
    seconds, total = search_seconds(result.best.get("seconds", {}), result.best.get("unit_order"))
    return {"kind": "search", "ratio": ratio, "block_ratio": result.best["best"]["block_ratio"],
            "metrics": evaluate(exported.model, windows), "widths": result.best["best"]["widths"],
            "recipe_seconds": total,
            "record": {"run_dir": str(run_dir), "trials": result.completed, "config": config.to_dict(),
                       "seconds": seconds, "export": result.best["export"]}}


def search_cell(args, ratio: float, windows, dtype) -> dict | None:
    run_dir = args.runs / f"search-{args.searcher}-{ratio}"
    best = run_dir / "best.json"
    if not best.is_file() and args.search_trials:
        from search.config import SearchConfig
        from search.job import run_search

        run_search(SearchConfig.create(args.model, ratio, searcher=args.searcher, trials=args.search_trials),
                   run_dir, progress=False)
    if not best.is_file():
        return None
    summary = json.loads(best.read_text())
    exported = load_model(summary["export"], dtype=dtype)
    metrics = evaluate(exported.model, windows)
    seconds, total = search_seconds(summary.get("seconds", {}), summary.get("unit_order"))
    return {"kind": "search", "ratio": ratio, "block_ratio": summary["best"]["block_ratio"],
            "total_ratio": summary["best"]["total_ratio"], "metrics": metrics,
            "widths": summary["best"]["widths"], "recipe_seconds": total,
            "record": {"run_dir": str(run_dir), "completed_trials": summary.get("completed_trials"),
                       "config": summary.get("config"), "seconds": seconds}}


def main(argv=None) -> int:
    return common.exit_status(lambda: run(parse_args(argv), argv))  # a comparison that cannot go on as asked


def run(args, argv) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    config = {"model": args.model, "windows_2048": args.windows, "short_seqlen": args.short_seqlen,
              "held_out": args.held_out,
              "dtype": args.dtype, "max_calib_tokens": args.max_calib_tokens, "searcher": args.searcher,
              **({"calib_as_search": True} if args.calib_as_search else {}),
              **({"label": args.label} if args.label else {}),
              "eval": "WikiText-2 test and the held-out texts, first windows; in-process subnet_view, model "
                      "rectified in float32 then cast",
              "seed": 0}
    results = load_results(json_path, config)
    if args.report:
        report(args, results)
        return 0
    results["command"] = "LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/compare.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    results["environment"] = environment()
    results["ratios"] = args.ratios
    dtype = DTYPES[args.dtype]

    pristine = load_model(args.model, dtype=torch.float32)
    long = dataset_windows(pristine.tokenizer, "wikitext2", seqlen=2048, limit=args.windows)
    short = long.reshape(-1, args.short_seqlen)  # the same tokens
    windows = {"wikitext2_2048": long, f"wikitext2_{args.short_seqlen}": short,
               **{f"{name}_2048": dataset_windows(pristine.tokenizer, name, seqlen=2048, limit=args.windows)
                  for name in args.held_out}}
    cells = results["cells"]

    def save():
        write_json(json_path, results)

    @functools.cache
    def machine_peak() -> float:  # the bfloat16 matmul peak beside the wall times this run measures
        return round(matmul_tflops(torch.bfloat16), 3)

    if "dense" not in cells:
        dense = dense_copy(pristine)
        dense.model.to(dtype)
        cells["dense"] = {"kind": "dense", "ratio": 1.0, "metrics": evaluate(dense.model, windows)}
        del dense
        save()
    recipes = planned(args)
    caches = {recipe.name: OneShotCache() for recipe in recipes}  # per recipe, shared by its ratios
    for ratio in args.ratios:  # every recipe at one ratio before the next ratio
        for recipe in recipes:
            name = recipe.name
            key = f"{name}{args.label}:{ratio}"
            if key in cells:
                continue
            started = time.time()
            try:
                zeroshot = args.zeroshot if ratio in args.zeroshot_ratios else None
                cells[key] = recipe_cell(pristine, at_ratio(args, recipe, ratio), ratio, windows, dtype,
                                         caches[name], args.batch_size, zeroshot)
            except Exception as exc:  # one failing cell is reported, the table goes on
                log.exception("%s failed", key)
                cells[key] = {"kind": "recipe", "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"}
            cells[key]["wall_seconds"] = round(time.time() - started, 1)
            cells[key]["bf16_tflops"] = machine_peak()
            log.info("%s: %s", key, cells[key].get("metrics", cells[key].get("error")))
            save()
            gc.collect()
    for ratio in args.ratios if args.depth_search_trials else []:
        key = f"evopress-depth:{ratio}"
        if key not in cells:
            started = time.time()
            cells[key] = depth_search_cell(args, ratio, windows, dtype)
            cells[key]["wall_seconds"] = round(time.time() - started, 1)
            cells[key]["bf16_tflops"] = machine_peak()
            save()
    def measured(key: str, row: str, ratio: float) -> bool:  # again: rows read from quality.json before they
        # had the short windows, from another row's cell (the search row's defaults changed), or from a cell
        # measured again since
        cell = cells.get(key)
        if cell is None or f"wikitext2_{args.short_seqlen}" not in cell["metrics"]:
            return False
        if not args.search_cells:
            return True
        kept = (cell["record"].get("from") == quality_source(args.search_cells[0], ratio, row)
                and not quality_changed(args.search_cells[0], cell))
        if kept:
            refresh_seconds(args.search_cells[0], cell)
        return kept

    for ratio in args.ratios if not args.label else []:
        key = f"search:{ratio}"
        if measured(key, args.search_cells[1] if args.search_cells else None, ratio):
            continue
        cell = (quality_cell(args, ratio, args.search_cells[1], windows, dtype) if args.search_cells else
                search_cell(args, ratio, windows, dtype))
        if cell is not None:
            cells[key] = cell
        elif args.search_cells:  # the search row's quality.py row has no cell at this ratio yet: a "–",
            cells.pop(key, None)  # not another row's numbers
        save()
    for tyr_row in args.tyr_rows if args.search_cells else []:
        name = tyr_row_name(tyr_row)
        for ratio in args.ratios:
            key = f"{name}:{ratio}"
            row = budget_row(ratio, tyr_row, args.search_cells[1])
            if same_search(ratio, row, args.search_cells[1]) and f"search:{ratio}" in cells:
                # the same search and export as the search row (tyr-equal at ratios whose defaults are tyr's)
                cells[key] = {**copy.deepcopy(cells[f"search:{ratio}"]), "same_as": f"search:{ratio}"}
            elif measured(key, row, ratio):
                cells[key].pop("same_as", None)  # the search row's cell until its defaults changed: kept
                # (with its short windows and zero-shot), now a row of its own
            elif (cell := quality_cell(args, ratio, row, windows, dtype)) is not None:
                cells[key] = cell
            save()
    for key in [k for k, c in cells.items() if "from" in c.get("record", {}) and "same_as" not in c]:
        if short_windows_of_seeds(cells[key], windows, dtype, f"wikitext2_{args.short_seqlen}"):
            save()
    if args.zeroshot:
        add_zeroshot(args, cells, pristine, recipes, caches, save)
    save()
    report(args, results)
    return 0


def report(args, results: dict) -> None:
    """compare.md and compare.png, the rows of the ``--merge`` files joined to this comparison's."""
    from compare_report import write_report

    merged = dict(results, cells=dict(results["cells"]))
    for path in args.merge:
        other = json.loads(path.read_text())
        merged["cells"].update({k: v for k, v in other["cells"].items() if k != "dense"})
        merged.setdefault("merged", []).append({"file": str(path), "config": other["config"],
                                                "command": other.get("command")})
    write_report(merged, args.out)


def add_zeroshot(args, cells: dict, pristine, recipes, caches, save) -> None:
    """The zero-shot average of the dense model and of every row at ``--zeroshot-ratios`` where a cell
    lacks it: a recipe runs again (its perplexities kept), a search row is read or measured on its export."""
    limit = args.zeroshot
    if "zeroshot" not in cells["dense"]:
        dense = dense_copy(pristine)
        dense.model.to(DTYPES[args.dtype])
        cells["dense"]["zeroshot"] = zeroshot_scores(dense.model, dense.tokenizer, limit)
        del dense
        save()
    for ratio in (r for r in args.zeroshot_ratios if r in args.ratios):
        for recipe in recipes:
            cell = cells.get(f"{recipe.name}{args.label}:{ratio}")
            if cell is not None and "error" not in cell and "zeroshot" not in cell:
                again = recipe_cell(pristine, at_ratio(args, recipe, ratio), ratio, {}, DTYPES[args.dtype],
                                    caches[recipe.name], args.batch_size, limit)
                cell["zeroshot"] = again["zeroshot"]
                save()
        for row in ("search", *map(tyr_row_name, args.tyr_rows), "evopress-depth") if not args.label else ():
            cell = cells.get(f"{row}:{ratio}")
            if cell is not None and "zeroshot" not in cell:
                cell["zeroshot"] = search_zeroshot(cell, limit)
                save()


if __name__ == "__main__":
    sys.exit(main())
