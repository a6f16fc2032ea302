"""Can the fitness keep its least-squares state (``L⁻¹``, ``P``) in bfloat16 instead of float32?
Issue 15, item 2: half the solver memory, if the fitness still ranks candidates the same way. (o_proj's
factor and ``B``, for kept head sets that are not prefixes, stay float32: in bfloat16 they put the
fitness 3-7x off, measured while building this; see reform/lstsq.py.)

Candidates: SmolLM2-135M subnets at block ratios 0.5-0.8 (the search's one-shot starts and
level-switch mutants of them, as in ``experiments/fitness_rank.py``). Each is scored by the search's
fitness (perplexity on the 8 x 512 fitness windows, model in bfloat16, o_proj/down_proj rectified)
twice: solver state in float32 (today's default) and in bfloat16. The table gives the rank agreement
(Spearman, over all candidates and within a ratio, where the search decides), the relative
difference of the values, whether the best candidate of each ratio is the same, and the seconds per
candidate of each (same run, same machine).

    LLM_PRUNER_DATA=../shared/data python experiments/solver_precision.py --per-ratio 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from experiments.outputs import command_line, write_results  # noqa: E402
from experiments.fitness_rank import RATIOS, candidates, permuted_smollm2, spearman  # noqa: E402
from reform.local import output_solvers  # noqa: E402
from search.cli.common import parse_args_with_config  # noqa: E402
from search.config import FITNESS_REGION  # noqa: E402
from search.fitness import Fitness  # noqa: E402
from search.prepare import PREFIX_ONLY  # noqa: E402
from search.widths import WidthSpace  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STATES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-ratio", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "solver_precision.json")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    adapter, tokenizer, ordered, statistics = permuted_smollm2()
    solvers = {name: output_solvers(adapter, statistics, precompute=dtype, prefix_only=PREFIX_ONLY)
               for name, dtype in STATES.items()}
    state_bytes = {name: sum(s.state_bytes() for layer in layers for s in layer.values())
                   for name, layers in solvers.items()}
    pool = candidates(WidthSpace(adapter.dims, preset="wide"), ordered, args.per_ratio, args.seed)
    windows = CalibrationSpec("wikitext2", 8, 512, 1, FITNESS_REGION).windows(tokenizer)
    adapter.model.to(torch.bfloat16)
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    rows, seconds = [], {name: 0.0 for name in STATES}
    for ratio, subnet in pool:
        row = {"ratio": ratio, "block_ratio": subnet.ratio()}
        for name, layers in solvers.items():  # a fresh fitness: every layer solved, none from a cache
            t0 = time.perf_counter()
            row[name] = Fitness(adapter, windows, solvers=layers).evaluate(subnet).value
            seconds[name] += time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    a, b = [r["float32"] for r in rows], [r["bfloat16"] for r in rows]
    within = {ratio: spearman([r["float32"] for r in rows if r["ratio"] == ratio],
                              [r["bfloat16"] for r in rows if r["ratio"] == ratio]) for ratio in RATIOS}
    same_best = {ratio: min((r for r in rows if r["ratio"] == ratio), key=lambda r: r["float32"]) is
                 min((r for r in rows if r["ratio"] == ratio), key=lambda r: r["bfloat16"]) for ratio in RATIOS}
    relative = [abs(y - x) / x for x, y in zip(a, b)]
    summary = {"candidates": len(rows), "spearman_all": spearman(a, b), "spearman_within_ratio": within,
               "same_best_per_ratio": same_best, "max_relative_difference": max(relative),
               "median_relative_difference": float(np.median(relative)), "state_bytes": state_bytes,
               "seconds_per_candidate": {k: v / len(rows) for k, v in seconds.items()}, **peak}
    data = {"summary": summary, "rows": rows, "seconds": round(time.time() - started, 1),
            "environment": environment(),
            "command": command_line(__file__, argv)}
    write_results(args.out, data, report)
    return 0


def report(data: dict) -> str:
    s = data["summary"]
    machine = data["environment"]["machine"]
    lines = ["# The fitness's least-squares state in bfloat16 (SmolLM2-135M)", "", __doc__.split("\n\n")[1], "",
             f"`{data['command']}` ({data['seconds']:.0f} s; {machine['cpu']}, {machine['threads']} threads, "
             f"bf16 matmul peak {s['bf16_tflops']:.2f} TFLOP/s in the same run; other jobs shared the CPU)", "",
             f"- candidates: {s['candidates']}; Spearman float32 vs bfloat16 over all: {s['spearman_all']:.4f}",
             "- Spearman within a ratio: " + ", ".join(f"{r}: {v:.4f}" for r, v in s["spearman_within_ratio"].items()),
             "- same best candidate per ratio: " + ", ".join(f"{r}: {v}" for r, v in s["same_best_per_ratio"].items()),
             f"- relative difference of the fitness: median {s['median_relative_difference']:.2e}, "
             f"max {s['max_relative_difference']:.2e}",
             "- state bytes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in s["state_bytes"].items()),
             "- seconds per candidate (every layer solved): "
             + ", ".join(f"{k} {v:.2f}" for k, v in s["seconds_per_candidate"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
