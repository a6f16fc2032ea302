"""Which fitness ranks candidates like text no step fitted: calibration perplexity (``ppl``) or KL to
the dense model (``kl``)? Issue 13, item 2.

Candidates: SmolLM2-135M subnets at block ratios 0.5, 0.6, 0.7 and 0.8, each the one-shot starts of
the search and level-switch mutants of them (``--per-ratio`` in all), o_proj/down_proj refitted by
the search's local least squares. Each is scored by both fitness kinds on the search's fitness
windows (8 x 512 from the fitness region of WikiText-2 validation, bfloat16, as in a search), and
measured in float32 on 8 windows of 512 of: the re-scoring region of WikiText-2 validation, PTB
validation and c4:heldout (never a test split); for ``--zeroshot`` of them, the seven tasks' average
(first ``--zeroshot-limit`` each). The table gives Spearman's rank correlation of each fitness with
each measure, over all candidates and within each ratio (where the search decides).

    LLM_PRUNER_DATA=../shared/data python experiments/fitness_rank.py --per-ratio 10 --zeroshot 20

The JSON (``--out``) is written after every candidate; the same command resumes after the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evaluators.data import CalibrationSpec, dataset_windows
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from evaluators.harness import TASKS, evaluate_zeroshot
from reform.local import output_solvers, solver_overrides
from search.cli.common import parse_args_with_config
from search.config import FITNESS_REGION, RESCORING_REGION, STATISTICS_REGION, SearchConfig
from search.fitness import Fitness
from search.prepare import dense_scores, starts_for
from search.samplers.levels import LevelSwitches
from search.widths import WidthSpace
from space.adapters import adapter_for
from space.export import write_json
from space.models import load_model
from space.order import order_model
from space.scores import score_spec
from space.views import subnet_view

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.5, 0.6, 0.7, 0.8)
MEASURES = ("wikitext2:rescoring", "ptb:validation", "c4:heldout")
RESAMPLES = 2000  # the bootstrap of the KL - ppl difference


def ranks(values: list[float]) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values), dtype=float)
    for value in set(values):
        tied = [i for i, v in enumerate(values) if v == value]
        out[tied] = out[tied].mean()
    return out


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def permuted_smollm2():
    """SmolLM2-135M in float32, permuted into wanda-sp order as a search prepares it (scores from the
    shared cache): the adapter, its tokenizer, the sorted scores and the statistics windows."""
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter, tokenizer = adapter_for(loaded.model), loaded.tokenizer
    statistics = CalibrationSpec("wikitext2", 64, 512, 0, STATISTICS_REGION)
    scores = dense_scores(loaded, ["wanda-sp"], statistics).scores["wanda-sp"]
    _, ordered = order_model(adapter, scores)
    return adapter, tokenizer, ordered, statistics.windows(tokenizer)


def candidates(space: WidthSpace, ordered, per_ratio: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    switches = LevelSwitches(space, attention_prob=0.25, max_switches=6)
    out = []
    for ratio in RATIOS:  # the search's own starts at each ratio, then mutants of them
        chosen = starts_for(SearchConfig(model="smollm2-135m", ratio=ratio), space, ordered,
                            score_spec("wanda-sp").standardized)
        while len(chosen) < per_ratio:
            parent = chosen[int(rng.integers(len(chosen)))]
            child = switches.mutate(parent, rng, space.bounds.step * int(rng.integers(1, 5)))
            if child not in chosen:
                chosen.append(child)
        out += [(ratio, c) for c in chosen[:per_ratio]]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-ratio", type=int, default=10)
    parser.add_argument("--zeroshot", type=int, default=20, help="candidates (evenly spread) with zero-shot scores")
    parser.add_argument("--zeroshot-limit", type=int, default=100)
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 per measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fitness_rank.json")
    parser.add_argument("--report", action="store_true", help="only write the Markdown table of --out's JSON")
    return parse_args_with_config(parser, argv)


def spearman_table(rows: list[dict], measures=(*MEASURES, "zeroshot")) -> dict:
    """Each fitness's Spearman correlation with each measure: over all candidates, within each ratio
    (where the search decides) and their mean; None where fewer than three candidates have the measure."""
    table = {}
    for measure in measures:
        for kind in ("ppl", "kl"):
            sign = -1.0 if measure == "zeroshot" else 1.0  # higher accuracy is better
            measured = [r for r in rows if measure in r and math.isfinite(r[measure])]
            pairs = {ratio: [(r[f"fitness_{kind}"], sign * r[measure]) for r in measured if r["ratio"] == ratio]
                     for ratio in RATIOS}
            everywhere = [pair for ratio in RATIOS for pair in pairs[ratio]]
            within = {str(ratio): spearman(*zip(*pairs[ratio])) for ratio in RATIOS if len(pairs[ratio]) > 2}
            table[f"{measure}/{kind}"] = {"all": spearman(*zip(*everywhere)) if len(everywhere) > 2 else None,
                                          "within_ratio": within,
                                          "within_ratio_mean": float(np.mean(list(within.values()))) if within else None}
    return table


def kl_minus_ppl(rows: list[dict], measure: str, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """How far the KL fitness's mean within-ratio Spearman with ``measure`` exceeds the perplexity
    fitness's, with a bootstrap over the candidates (resampled within each ratio, both fitnesses on the
    same resample): the difference, its 5th / 95th percentiles and the share of resamples above zero."""
    rng = np.random.default_rng(seed)
    by_ratio = [[r for r in rows if r["ratio"] == ratio and measure in r] for ratio in RATIOS]

    def difference(sample: list[dict]) -> float:
        table = spearman_table(sample, [measure])
        kl, ppl = table[f"{measure}/kl"]["within_ratio_mean"], table[f"{measure}/ppl"]["within_ratio_mean"]
        return kl - ppl if kl is not None and ppl is not None else math.nan

    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one repeated candidate has no ranks
        draws = np.array([difference([pool[i] for pool in by_ratio for i in rng.integers(len(pool), size=len(pool))])
                          for _ in range(resamples)])
    draws = draws[np.isfinite(draws)]
    return {"difference": difference(rows), "p5": float(np.percentile(draws, 5)),
            "p95": float(np.percentile(draws, 95)), "above_zero": float((draws > 0).mean()), "resamples": len(draws)}


def report(data: dict, out: Path) -> str:
    """The Markdown table of a run's JSON (``out``), and the hand-written notes beside it."""
    rows, table = data["rows"], spearman_table(data["rows"])
    machine = data["environment"]["machine"]
    with_zeroshot = sum("zeroshot" in r for r in rows)
    lines = ["# KL vs perplexity fitness: which ranks candidates like text no step fitted (issue 13, item 2)", "",
             f"Command: `LLM_PRUNER_DATA=../shared/data {data['command']}`", "",
             f"{len(rows)} candidates (the search's starts and level-switch mutants of them at block ratios "
             f"{', '.join(map(str, RATIOS))}; wanda-sp order, o_proj / down_proj refitted by local least squares on "
             "the search's statistics windows). Fitness: 8 windows of 512 tokens of the fitness region of WikiText-2 "
             "validation, bfloat16, as in a search. Measures: float32, "
             f"{data['config']['windows']} windows of 512 of the re-scoring region of WikiText-2 validation, of PTB "
             f"validation and of c4:heldout; the zero-shot average of the seven tasks (first "
             f"{data['config']['zeroshot_limit']} each) for {with_zeroshot} of them, evenly spread. No test split. "
             f"Machine: {machine['cpu']}, {machine['threads']} threads; {data['seconds'] / 60:.0f} min.", "",
             "Spearman's rank correlation of each fitness (lower is better) with each measure (perplexity; for the "
             "zero-shot, minus the accuracy), over all candidates and within each ratio (where a search decides):", "",
             "| measure | fitness | all candidates | " + " | ".join(f"within {r}" for r in RATIOS) + " | mean within |",
             "|---|---|---|" + "---|" * (len(RATIOS) + 1)]

    def cell(value):
        return "–" if value is None else f"{value:.3f}"

    for key, v in table.items():
        measure, kind = key.split("/")
        lines.append(f"| {measure} | {kind} | {cell(v['all'])} | "
                     + " | ".join(cell(v["within_ratio"].get(str(r))) for r in RATIOS)
                     + f" | {cell(v['within_ratio_mean'])} |")
    lines += ["", "KL minus perplexity fitness, mean within-ratio Spearman, with a bootstrap of the candidates "
              f"({RESAMPLES} resamples within each ratio, seed 0; 90 % interval):", "",
              "| measure | KL - ppl | 90 % interval | resamples where KL ranks better |", "|---|---|---|---|"]
    for measure in [*MEASURES, "zeroshot"]:
        if table[f"{measure}/kl"]["within_ratio_mean"] is not None:
            b = kl_minus_ppl(rows, measure)
            lines.append(f"| {measure} | {b['difference']:+.3f} | {b['p5']:+.3f} to {b['p95']:+.3f} | "
                         f"{b['above_zero']:.0%} |")
    notes = out.with_suffix(".notes.md")  # hand-written findings, kept across re-runs
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> str:
    """fitness_rank.md beside the JSON ``out``; its text. The JSON's ``spearman`` is recomputed from its
    rows first, so that a file written by an earlier form of the table has today's fields (per ratio)."""
    data = json.loads(out.read_text())
    if data["spearman"] != (table := spearman_table(data["rows"])):
        write_json(out, {**data, "spearman": table})
    text = report(data, out)
    out.with_suffix(".md").write_text(text)
    return text


def finished_rows(path: Path, config: dict, pool: list) -> list[dict]:
    """The candidates an earlier run of the same configuration measured (the JSON is written after each
    one), kept while each row's widths are the pool's candidate at its place; a file of another
    configuration is refused."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data.get("config") != config:
        print(f"{path} holds another configuration ({data.get('config')}); use another --out", file=sys.stderr)
        raise SystemExit(2)
    rows = []
    for row, (ratio, subnet) in zip(data["rows"], pool):
        if row["ratio"] != ratio or row["widths"] != widths_of(subnet):
            break
        rows.append(row)
    return rows


def widths_of(subnet) -> list[list[int]]:
    return [[w.kv_heads, w.q_per_kv, w.channels] for w in subnet.layers]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        write_report(args.out)
        return 0
    config = {"per_ratio": args.per_ratio, "zeroshot": args.zeroshot, "zeroshot_limit": args.zeroshot_limit,
              "windows": args.windows, "seed": args.seed}
    started = time.time()
    adapter, tokenizer, ordered, statistics = permuted_smollm2()
    space = WidthSpace(adapter.dims, preset="wide")
    pool = candidates(space, ordered, args.per_ratio, args.seed)
    rows = finished_rows(args.out, config, pool)
    seconds = json.loads(args.out.read_text())["seconds"] if rows else 0.0
    solvers = output_solvers(adapter, statistics, precompute=torch.float32)
    measures = {  # the re-scoring region's random windows; the first windows of the held-out texts
        "wikitext2:rescoring": CalibrationSpec("wikitext2", args.windows, 512, 3, RESCORING_REGION).windows(tokenizer),
        **{name: dataset_windows(tokenizer, name, seqlen=512, limit=args.windows)
           for name in ("ptb:validation", "c4:heldout")}}
    fitness_windows = CalibrationSpec("wikitext2", 8, 512, 1, FITNESS_REGION).windows(tokenizer)
    command = "python experiments/fitness_rank.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for i, (ratio, subnet) in enumerate(pool):
        if i < len(rows):
            continue
        overrides = solver_overrides(adapter, subnet, solvers)
        row = {"ratio": ratio, "block_ratio": subnet.ratio(), "widths": widths_of(subnet)}
        with subnet_view(adapter, subnet, overrides) as model:
            row.update({name: perplexity(model, w) for name, w in measures.items()})
        adapter.model.to(torch.bfloat16)
        for kind in ("ppl", "kl"):
            fitness = Fitness(adapter, fitness_windows, solvers=solvers, kind=kind)
            row[f"fitness_{kind}"] = fitness.evaluate(subnet).value
        adapter.model.to(torch.float32)
        if args.zeroshot and i % max(1, len(pool) // args.zeroshot) == 0 and \
                sum("zeroshot" in r for r in rows) < args.zeroshot:
            with subnet_view(adapter, subnet, overrides) as model:
                row["zeroshot"] = evaluate_zeroshot(model, tokenizer, list(TASKS),
                                                    limit=args.zeroshot_limit)["zeroshot_avg"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
        # after every candidate: an interrupted run resumes here (the seconds add up over the runs)
        write_json(args.out, {"config": config, "rows": rows, "spearman": spearman_table(rows),
                              "seconds": round(seconds + time.time() - started, 1), "environment": environment(),
                              "command": command})
    print(write_report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
