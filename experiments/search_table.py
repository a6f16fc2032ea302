"""Search measurements (issue 6) on SmolLM2-135M.

For each ratio and searcher, a search job (its own run folder under ``--runs``; a re-run resumes
it) against the best one-shot recipe + least squares (uniform-mlp or global allocation, whichever
is better), all exported winners and baselines scored on the same WikiText-2 test windows.
Also: a search whose fitness ignores the rectification (what rectifying inside the fitness buys),
candidate evaluations per minute, the share of wall time spent evaluating, achieved GFLOP/s
during evaluation against this machine's bfloat16 matmul rate, and the rank agreement of
bfloat16 and float32 fitness.

    LLM_PRUNER_DATA=../shared/data python experiments/search_table.py --trials 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import optuna
import torch

from evaluators.data import dataset_windows
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from reform.rectify import ReformSpec, rectify
from search.oneshot.allocation import allocate
from search.cli.common import parse_args_with_config
from search.config import SearchConfig
from search.job import run_search
from evaluators.environment import matmul_tflops
from search.rundir import load_run_study
from search.prepare import dense_scores
from space.order import order_model
from space.adapters import adapter_for
from space.export import write_json
from space.scores import score_spec
from space.models import load_model
from space.views import subnet_view
from space.subnet import LayerWidths, Subnet

RESULTS = Path(__file__).parent / "results"


def search_config(args, ratio: float, searcher: str, **overrides) -> SearchConfig:
    values = dict(model="smollm2-135m", ratio=ratio, searcher=searcher, trials=args.trials, seed=args.seed,
                  importance=args.importance, evolution="cpu", eval_windows=args.windows)
    values.update(overrides)
    return SearchConfig(**values)


def study_stats(run_dir: Path, vocab: int, hidden: int) -> dict:
    study = load_run_study(run_dir)
    trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    best = json.loads((run_dir / "best.json").read_text())
    fitness = best["config"]["fitness_windows"]
    tokens = fitness["nsamples"] * fitness["seqlen"]
    eval_seconds = [t.user_attrs["eval_seconds"] for t in trials]
    flops = [tokens * (t.user_attrs["gflops_per_token_512"] * 1e9 + 2 * hidden * vocab) for t in trials]
    running, curve = float("inf"), []
    for t in trials:
        running = min(running, t.value)
        curve.append(running)
    loop = best["seconds"]["search"]
    return {
        "trials": len(trials),
        "loop_seconds": loop,
        "evaluations_per_minute": len(trials) / loop * 60,
        "evaluation_share": sum(eval_seconds) / loop,
        "median_eval_seconds": statistics.median(eval_seconds),
        "achieved_gflops": sum(flops) / sum(eval_seconds) / 1e9,
        "best_curve": curve,
    }


def rank_agreement(args, out: dict) -> None:
    """Spearman correlation of float32 and bfloat16 fitness over the first trials of a study."""
    from scipy.stats import spearmanr

    from search.fitness import Fitness
    from reform.local import output_solvers

    run_dir = Path(args.runs) / "search-evolution-0.5"
    study = load_run_study(run_dir)
    trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])[: args.rank_candidates]
    config = search_config(args, 0.5, "evolution")
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    scores = dense_scores(loaded, [config.importance], config.calibration_spec(),
                          copy_to=run_dir / "importance.pt").scores[config.importance]
    order_model(adapter, scores)
    solvers = output_solvers(adapter, config.calibration_spec().windows(loaded.tokenizer))
    windows = config.calibration_spec("fitness_windows").windows(loaded.tokenizer)
    values = {}
    for dtype in ("float32", "bfloat16"):
        adapter.model.to(getattr(torch, dtype))
        fitness = Fitness(adapter, windows, solvers=solvers)
        t = time.time()
        values[dtype] = [fitness.evaluate(Subnet(adapter.dims, [LayerWidths(*w) for w in tr.user_attrs["widths"]])).value
                         for tr in trials]
        values[dtype + "_seconds"] = (time.time() - t) / len(trials)
    rho = spearmanr(values["float32"], values["bfloat16"]).statistic
    out["rank_agreement"] = {"candidates": len(trials), "spearman": float(rho), **values}


def baselines(args, out: dict, test: torch.Tensor, ratios: list[float]) -> None:
    """The best one-shot recipe + least squares at each ratio, on the same test windows."""
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    config = search_config(args, 0.5, "evolution")
    calibration = config.calibration_spec().windows(loaded.tokenizer)
    adapter = adapter_for(loaded.model)
    scores = dense_scores(loaded, [args.importance], config.calibration_spec()).scores[args.importance]
    _, ordered = order_model(adapter, scores)
    for ratio in ratios:
        for allocation in ("uniform-mlp", "global"):
            key = f"{allocation}+lstsq/{ratio}"
            if key in out["baselines"]:
                continue
            subnet = allocate(allocation, adapter.dims, ordered, ratio=ratio,
                              standardized=score_spec(args.importance).standardized)
            t = time.time()
            overrides = rectify(adapter, subnet, calibration, spec=ReformSpec("lstsq", config.export_reform))
            with subnet_view(adapter, subnet, overrides) as model:
                ppl = perplexity(model, test)
            out["baselines"][key] = {"ppl": ppl, "block_ratio": subnet.ratio(), "seconds": time.time() - t}
            print(key, round(ppl, 3), flush=True)
            write_json(args.out, out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--searchers", nargs="+", default=["evolution", "tpe"])
    parser.add_argument("--importance", default="wanda-sp")
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows of 2048 (float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--rank-candidates", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out.setdefault("baselines", {})
    out.setdefault("runs", {})
    out["environment"] = environment()
    out["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    tokenizer = load_model("smollm2-135m").tokenizer
    test = dataset_windows(tokenizer, "wikitext2", seqlen=2048, limit=args.windows)
    jobs = [(ratio, searcher, {}) for ratio in args.ratios for searcher in args.searchers]
    if 0.5 in args.ratios:
        jobs.insert(len(args.searchers), (0.5, "evolution", {"fitness_reform": "none"}))
    for ratio, searcher, overrides in jobs:
        if not any(k.endswith(f"/{ratio}") for k in out["baselines"]):
            baselines(args, out, test, [ratio])
        name = f"search-{searcher}-{ratio}" + ("-fitness-unrectified" if overrides else "")
        run_dir = Path(args.runs) / name
        t = time.time()
        result = run_search(search_config(args, ratio, searcher, **overrides), run_dir, progress=False)
        summary = result.best
        stats = study_stats(run_dir, tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 49152, 576)
        out["runs"][name] = {"ratio": ratio, "searcher": searcher, **overrides, "test_ppl": summary["test"]["ppl"],
                             "best": summary["best"], "wall_seconds": time.time() - t, **stats}
        print(name, round(summary["test"]["ppl"], 3), flush=True)
        write_json(args.out, out)
    if "rank_agreement" not in out:
        rank_agreement(args, out)
        write_json(args.out, out)
    if "matmul_gflops" not in out:
        out["matmul_gflops"] = {"bfloat16": 1e3 * matmul_tflops(torch.bfloat16), "float32": 1e3 * matmul_tflops(torch.float32)}
        write_json(args.out, out)
    write_markdown(out, args.out.with_suffix(".md"))


def write_markdown(out: dict, path: Path) -> None:
    s = out["settings"]
    # every run measured so far, whichever invocation ran it
    ratios = sorted({run["ratio"] for run in out["runs"].values()})
    searchers = list(dict.fromkeys(run["searcher"] for run in out["runs"].values()))
    lines = ["# Search (issue 6): SmolLM2-135M", "",
             f"Reproduce: `LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/search_table.py --trials {s['trials']}` "
             "(raw numbers in `search.json`; every run folder under `runs/` has its own report.md and study).", "",
             f"Test perplexity: WikiText-2 test, first {s['windows']} windows of 2048 tokens, float32, of the exported "
             "winner (rectified by least squares, local mode) and of the baselines (same rectification).", "",
             "| ratio | best one-shot + lstsq | " + " | ".join(f"search: {x}" for x in searchers) + " | gain of the best search |",
             "|---|---|" + "---|" * len(searchers) + "---|"]
    for ratio in ratios:
        base = {k.split("/")[0]: v["ppl"] for k, v in out["baselines"].items() if k.endswith(f"/{ratio}")}
        if not base:
            continue
        name, value = min(base.items(), key=lambda kv: kv[1])
        cells, found = [], []
        for searcher in searchers:
            run = out["runs"].get(f"search-{searcher}-{ratio}")
            cells.append(f"{run['test_ppl']:.2f}" if run else "–")
            if run:
                found.append(run["test_ppl"])
        gain = f"{(1 - min(found) / value):.1%} lower" if found else "–"
        lines.append(f"| {ratio} | {value:.2f} ({name}) | " + " | ".join(cells) + f" | {gain} |")
    unrect = out["runs"].get("search-evolution-0.5-fitness-unrectified")
    rect = out["runs"].get("search-evolution-0.5")
    if unrect and rect:
        lines += ["", "## What rectifying inside the fitness buys (ratio 0.5, evolution)", "",
                  "| fitness | test ppl of the exported winner (rectified after the search) |", "|---|---|",
                  f"| candidates scored after least squares | {rect['test_ppl']:.2f} |",
                  f"| candidates scored without it (the paper's order) | {unrect['test_ppl']:.2f} |"]
    lines += ["", "## Throughput", "", f"bfloat16 matmul rate of this machine: {out['matmul_gflops']['bfloat16']:.0f} GFLOP/s "
              f"(float32: {out['matmul_gflops']['float32']:.0f}).", "",
              "| run | trials | evaluations/min | share of wall time evaluating | median s/candidate | achieved GFLOP/s |",
              "|---|---|---|---|---|---|"]
    for name, run in out["runs"].items():
        lines.append(f"| {name} | {run['trials']} | {run['evaluations_per_minute']:.1f} | {run['evaluation_share']:.0%} | "
                     f"{run['median_eval_seconds']:.2f} | {run['achieved_gflops']:.0f} |")
    agreement = out.get("rank_agreement")
    if agreement:
        lines += ["", f"bfloat16 vs float32 fitness on {agreement['candidates']} candidates of the 0.5 evolution study: "
                  f"Spearman {agreement['spearman']:.3f}; {agreement['float32_seconds']:.2f} s vs "
                  f"{agreement['bfloat16_seconds']:.2f} s per candidate."]
    lines += ["", "Search curves: `search_curves.png`."]
    notes = path.with_suffix(".notes.md")  # hand-written findings, kept across re-runs
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    path.write_text("\n".join(lines) + "\n")
    curves_plot(out, path.with_name("search_curves.png"))


def curves_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in out["runs"].items():
        ax.plot(range(1, len(run["best_curve"]) + 1), run["best_curve"], label=name.removeprefix("search-"))
    ax.set_yscale("log")
    ax.set_xlabel("trials")
    ax.set_ylabel("best calibration perplexity so far")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
