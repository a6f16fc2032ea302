"""Pictures and the Markdown report of a search run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from search.fitness import NAMES as FITNESS_NAMES  # noqa: E402
from space.subnet import Subnet  # noqa: E402


def width_profile(subnet: Subnet, path: Path, *, title: str = "") -> Path:
    """Per-layer kept fraction of query heads and of MLP channels."""
    dims = subnet.dims
    layers = range(dims.num_layers)
    heads = [w.heads / dims.num_heads for w in subnet.layers]
    channels = [w.channels / dims.intermediate_size for w in subnet.layers]
    fig, ax = plt.subplots(figsize=(max(6, dims.num_layers * 0.28), 3.2))
    ax.bar([i - 0.2 for i in layers], heads, width=0.4, label="attention heads", color="#4878cf")
    ax.bar([i + 0.2 for i in layers], channels, width=0.4, label="MLP channels", color="#6acc65")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.7, dims.num_layers - 0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title or f"block ratio {subnet.ratio():.3f}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress_plot(study: optuna.Study, path: Path, *, baselines: dict[str, float] | None = None) -> Path:
    """Fitness of every finished trial and the running best."""
    trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    best, running = float("inf"), []
    for v in values:
        best = min(best, v)
        running.append(best)
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.scatter(numbers, values, s=8, alpha=0.5, label="trial")
    ax.plot(numbers, running, color="black", label="best so far")
    for name, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, label=name)
    return save_fitness_plot(fig, ax, study, "trial", path)


def front_plot(study: optuna.Study, path: Path) -> Path:
    """NSGA-II: every trial's (block ratio, perplexity), the Pareto front highlighted."""
    trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], s=8, alpha=0.4, label="trial")
    best = sorted((t for t in trials if t.number in front), key=lambda t: t.values[1])
    ax.plot([t.values[1] for t in best], [t.values[0] for t in best], "o-", color="black", ms=3, label="front")
    return save_fitness_plot(fig, ax, study, "block ratio (kept)", path)


def save_fitness_plot(fig, ax, study: optuna.Study, xlabel: str, path: Path) -> Path:
    """Finish a plot of the study's fitness (log scale) against ``xlabel`` and write it to ``path``."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(fitness_label(study))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fitness_label(study: optuna.Study) -> str:
    """What the study's first objective is (its metric name, as the dashboard shows it)."""
    return (study.metric_names or ["calibration perplexity"])[0]


def rectification(config: dict) -> str:
    """How the fitness rectified candidates (older run folders' configs lack fitness_statistics)."""
    if config["fitness_reform"] != "lstsq":
        return "without rectification"
    if config.get("fitness_statistics", "dense") == "upstream":
        return "after least-squares rectification on the statistics of the model pruned like the first start"
    return "after least-squares rectification"


def markdown_report(summary: dict, path: Path) -> Path:
    """``report.md`` of a run from the summary ``best.json`` holds."""
    c = summary["config"]
    fitness = FITNESS_NAMES[c.get("fitness", "ppl")]
    lines = [f"# Search report: {c['model']} at ratio {c['ratio']}", ""]
    lines += [f"Searcher `{c['searcher']}`, {summary['completed_trials']} trials, width preset `{c['preset']}`, "
              f"importance `{c['importance']}`, fitness: {fitness} on "
              f"{c['fitness_windows']['nsamples']} x {c['fitness_windows']['seqlen']} tokens of "
              f"{c['fitness_windows']['dataset']} {c['fitness_windows']['split']} "
              f"({rectification(c)}, "
              f"{c['dtype']}).", ""]
    best = summary["best"]
    lines += ["## Chosen subnet", "",
              "| trial | block ratio | total ratio | attention kept | MLP kept | "
              f"{fitness} (search) | {fitness} (re-scored) | WikiText-2 test ppl |", "|---|---|---|---|---|---|---|---|",
              f"| {best['trial']} | {best['block_ratio']:.4f} | {best['total_ratio']:.4f} | "
              f"{best['attention_ratio']:.1%} | {best['mlp_ratio']:.1%} | {best['search_value']:.3f} | "
              f"{best['rescored']:.3f} | {(summary.get('test') or {}).get('ppl', float('nan')):.3f} |", ""]
    if summary.get("test"):
        t = summary["test"]
        lines += [f"Test perplexity: WikiText-2 test, {t['windows']} windows of {t['seqlen']} tokens, {t['dtype']}, "
                  f"of the export in `{summary['export']}` (rectified: {summary['export_reform']}).", ""]
        held_out = summary.get("held_out") or {}
        if held_out:
            lines += ["On text no step calibrated on (the same windows and dtype):", "",
                      "| dataset | split | perplexity |", "|---|---|---|"]
            lines += [f"| {h['dataset']} | {h['split']} | {h['ppl']:.3f} |" for h in held_out.values()]
            lines.append("")
    lines += ["![width profile](width_profile.png)", ""]
    if not summary.get("front"):
        lines += ["![search progress](progress.png)", ""]
    if summary.get("front"):
        lines += ["## Front (NSGA-II)", "", "![front](front.png)", "", f"| trial | block ratio | {fitness} |",
                  "|---|---|---|"]
        lines += [f"| {f['trial']} | {f['ratio']:.4f} | {f['search_value']:.4g} |" for f in summary["front"]]
        lines.append("")
    lines += ["## Top candidates, re-scored", "", "| trial | search value | re-scored |", "|---|---|---|"]
    lines += [f"| {r['trial']} | {r['search_value']:.3f} | {r['rescored']:.3f} |" for r in summary["rescored"]]
    timing = summary["seconds"]
    # run folders finished before the preparation was timed have no "prepare"
    order = summary.get("unit_order")  # absent in run folders finished before it was recorded
    # a cold command spends the order's seconds too
    cached = (f"; the unit order read from the score cache, computed in {order['seconds']:.0f} s"
              if order and order["reused"] else "")
    prepare = (f"preparation {timing['prepare']:.0f} s (model, unit order, statistics{cached}), "
               if "prepare" in timing else "")
    lines += ["", "## Time", "", f"{prepare}search loop {timing['search']:.0f} s "
              f"({summary['completed_trials'] / max(timing['search'], 1e-9) * 60:.1f} trials/min), "
              f"re-scoring {timing['rescore']:.0f} s, export {timing['export']:.0f} s, test {timing['test']:.0f} s.",
              "", f"Open the study: `llm-pruner dashboard {summary['run_dir']}`", ""]
    path.write_text("\n".join(lines))
    return path
