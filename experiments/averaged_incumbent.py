"""Would the average of a staged search's late incumbents beat its winner on the re-scoring windows?

Late in a staged evolution most last-stage decisions are coin flips (stage_decisions.md: two disjoint
halves of the 16 windows agree in about two generations of three), so the incumbent walks among nearly
equal subnets. In a noisy walk around an optimum the mean of the positions is nearer the optimum than
any one of them (Polyak-Ruppert averaging). This script reads a finished run's incumbents (one per
committed generation), averages the MLP width of every layer over the last ``fraction`` of the
generations, and puts the average back on the grid with exactly the latest incumbent's attention shapes
and MLP total (largest remainders), so it has the latest incumbent's parameter count to the channel.
It then scores the averages and the run's winner with the run's own re-scoring fitness (the windows the
search's last step chooses on). Test text is not read.

    LLM_PRUNER_DATA=../shared/data python experiments/averaged_incumbent.py runs/quality/0.6/last8-seed0 [more runs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from search.artifacts import trial_subnet_of
from search.cli.common import exit_status
from search.plan import config_dims, model_config
from search.prepare import build_fitness, release_fitness
from search.rundir import BEST, load_run_config, load_run_study
from search.stages import committed
from search.widths import WidthSpace
from space.errors import UserError
from space.export import write_json
from space.subnet import LayerWidths, Subnet

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.25, 0.5)


def incumbent_path(study, dims) -> list[Subnet]:
    """The incumbent after each committed generation, in order (a kept incumbent repeats)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [trial_subnet_of(by_number[e["trial"]], dims) for e in committed(study)["history"]]


def averaged(path: list[Subnet], space: WidthSpace) -> Subnet:
    """The mean MLP width per layer over ``path``, on the grid, with the last subnet's attention shapes
    and MLP total: every layer gets the floor of its mean in grid steps, the steps left go to the
    largest remainders (ties: the earlier layer)."""
    last = path[-1]
    step, full = space.bounds.step, space.dims.intermediate_size
    removed = np.array([[(full - w.channels) / step for w in s.layers] for s in path]).mean(axis=0)
    target = sum(round((full - w.channels) / step) for w in last.layers)
    steps = np.floor(removed).astype(int)
    left = target - int(steps.sum())
    for i in np.argsort(-(removed - steps), kind="stable")[:left]:
        steps[i] += 1
    layers = [LayerWidths(w.kv_heads, w.q_per_kv, full - int(k) * step) for w, k in zip(last.layers, steps)]
    out = Subnet(space.dims, layers)
    if not space.contains(out) or out.block_params() != last.block_params():
        raise AssertionError("the average left the grid or the budget")
    return out


def study_run(run_dir: Path) -> dict:
    config = load_run_config(run_dir)
    if config.staged is None:
        raise UserError(f"{run_dir}: not a staged evolution (no incumbents to average)")
    best = json.loads((run_dir / BEST).read_text())
    dims = config_dims(model_config(config.model))
    space = WidthSpace(dims, preset=config.preset, mlp_step=config.mlp_step)
    path = incumbent_path(load_run_study(run_dir), dims)
    winner = Subnet(dims, [LayerWidths(*w) for w in best["best"]["widths"]])
    started = time.time()
    fitness = build_fitness(config, run_dir, windows="final_windows")
    prepared = time.time() - started
    rows = [{"candidate": "winner", "trial": best["best"]["trial"], "recorded": best["best"]["rescored"],
             "rescored": fitness.evaluate(winner).value, "ratio": winner.ratio()}]
    for fraction in FRACTIONS:
        tail = path[-max(2, int(round(fraction * len(path)))):]
        subnet = averaged(tail, space)
        rows.append({"candidate": f"mean of the last {fraction:.0%}", "generations": len(tail),
                     "distinct": len({tuple(s.layers) for s in tail}), "rescored": fitness.evaluate(subnet).value,
                     "ratio": subnet.ratio(), "widths": [[w.kv_heads, w.q_per_kv, w.channels] for w in subnet.layers]})
    del fitness
    release_fitness()
    return {"run": str(run_dir), "ratio": config.ratio, "seed": config.seed, "evolution": config.evolution,
            "generations": len(path), "prepare_s": prepared, "seconds": time.time() - started, "rows": rows}


def markdown(results: list[dict]) -> str:
    lines = ["# The average of a staged search's late incumbents against its winner (SmolLM2-135M)", "",
             "Command: `LLM_PRUNER_DATA=../shared/data python experiments/averaged_incumbent.py RUN [RUN ...]`. "
             "Each run's incumbents (one per generation) are averaged layer by layer over the last quarter or "
             "half of the generations, on the grid, with the latest incumbent's attention shapes and exact "
             "parameter count; every candidate is scored by the run's re-scoring fitness (its KL on the "
             "re-scoring windows, lower is better: what the search's last step chooses on). No test text.", "",
             "| run | ratio | seed | evolution | winner (recorded / again) | mean of the last 25 % | mean of the last 50 % | "
             "best |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        win, *means = r["rows"]
        cells = [f"{m['rescored']:.4f} ({(m['rescored'] / win['rescored'] - 1) * 100:+.1f} %)" for m in means]
        best = min(r["rows"], key=lambda m: m["rescored"])["candidate"]
        lines.append(f"| {r['run']} | {r['ratio']} | {r['seed']} | {r['evolution']} | "
                     f"{win['recorded']:.4f} / {win['rescored']:.4f} | {' | '.join(cells)} | {best} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=RESULTS / "averaged_incumbent.json")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / BEST).is_file():
            raise UserError(f"{run}: no {BEST} (not a finished search)")
    done = {r["run"]: r for r in json.loads(args.out.read_text())["runs"]} if args.out.is_file() else {}
    for run in args.runs:
        if str(run) not in done:
            done[str(run)] = study_run(run)
            print(json.dumps({k: v for k, v in done[str(run)].items() if k != "rows"}),
                  [(m["candidate"], round(m["rescored"], 4)) for m in done[str(run)]["rows"]], flush=True)
            write_json(args.out, {"runs": list(done.values())})
    args.out.with_suffix(".md").write_text(markdown(list(done.values())))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
