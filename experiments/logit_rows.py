"""How many rows of logits to form at once when a candidate's KL to the dense model is scored.

The fitness forms the float32 logits of a batch of windows a chunk of positions at a time
(``evaluators.perplexity.logit_chunks``). Until 2026-12-07 a chunk was 512 positions of every window
in the batch: one chunk of 8 x 511 rows (0.8 GB of float32 logits, then their log-softmax) for the
staged evolution's last stage and the re-scoring. Now a chunk is at most ``LOGIT_ROWS`` (512) rows.
This script scores the same children both ways, interleaved so that both see the same machine load,
on SmolLM2-135M permuted by wanda-sp with the fitness's least squares (as throughput.py), in
bfloat16, at the staged evolution's batch sizes (1, 4 and 8 windows of 512 tokens), and prints the
median seconds a child and the largest relative difference of the KL values.

    LLM_PRUNER_DATA=../shared/data python experiments/logit_rows.py --children 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from experiments.outputs import command_line, write_results  # noqa: E402
from experiments.fitness_rank import permuted_smollm2  # noqa: E402
from experiments.throughput import children  # noqa: E402
from reform.local import output_solvers  # noqa: E402
from search.config import FITNESS_REGION  # noqa: E402
from search.fitness import Fitness  # noqa: E402
from search.prepare import PREFIX_ONLY  # noqa: E402
from search.widths import WidthSpace  # noqa: E402

perplexity_module = sys.modules["evaluators.perplexity"]  # the package exports a function of that name
RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 4, 8)
SEQLEN = 512


def timed(fitness: Fitness, child, rows: int) -> tuple[float, float]:
    perplexity_module.LOGIT_ROWS = rows
    started = time.perf_counter()
    value = fitness.evaluate(child).value
    return time.perf_counter() - started, value


def measure(fitness: Fitness, pool: list, batch: int) -> dict:
    """Per child: seconds and value with 512-position chunks over the batch (before) and 512-row chunks."""
    settings = {"before": SEQLEN * batch, "after": perplexity_module.LOGIT_ROWS}
    for child in pool[:1]:  # warm: the solves cached, the allocator primed
        for rows in settings.values():
            timed(fitness, child, rows)
    seconds = {name: [] for name in settings}
    differences = []
    for i, child in enumerate(pool):
        order = list(settings.items()) if i % 2 == 0 else list(settings.items())[::-1]
        values = {}
        for name, rows in order:
            s, values[name] = timed(fitness, child, rows)
            seconds[name].append(s)
        differences.append(abs(values["after"] - values["before"]) / values["before"])
    perplexity_module.LOGIT_ROWS = settings["after"]
    before, after = statistics.median(seconds["before"]), statistics.median(seconds["after"])
    return {"batch": batch, "children": len(pool), "before_s": before, "after_s": after, "speedup": before / after,
            "max_relative_difference": max(differences)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS / "logit_rows.json")
    args = parser.parse_args(argv)
    started = time.time()
    adapter, tokenizer, ordered, statistics_ = permuted_smollm2()
    solvers = output_solvers(adapter, statistics_, precompute=torch.float32, prefix_only=PREFIX_ONLY)
    adapter.model.to(torch.bfloat16)
    pool = children(WidthSpace(adapter.dims, preset="wide"), ordered, args.ratio, args.children, 0)
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16)}
    windows = CalibrationSpec("wikitext2", max(BATCHES), SEQLEN, 1, FITNESS_REGION).windows(tokenizer)
    rows = []
    for batch in BATCHES:
        fitness = Fitness(adapter, windows[:batch], solvers=solvers, batch_size=batch, prefix_bytes=0, kind="kl")
        rows.append(measure(fitness, pool, batch))
        print(rows[-1], flush=True)
    data = {"ratio": args.ratio, "rows": rows, "logit_rows": perplexity_module.LOGIT_ROWS, "peak": peak,
            "seconds": round(time.time() - started, 1), "environment": environment(),
            "command": command_line(__file__, argv)}
    write_results(args.out, data, report)
    return 0


def report(data: dict) -> str:
    machine = data["environment"]["machine"]
    lines = ["# Logits in chunks of rows (SmolLM2-135M, the KL fitness in bfloat16, one CPU worker)", "",
             __doc__.split("\n\n")[1], "",
             f"`{data['command']}` ({data['seconds']:.0f} s; {machine['cpu']}, {machine['threads']} threads; bfloat16 "
             f"matmul peak {data['peak']['bf16_tflops']:.2f} TFLOP/s in the same run). Ratio {data['ratio']}, "
             f"children of one incumbent (level switches), each scored both ways.", "",
             f"| windows in the batch | children | 512 positions a chunk s | {data['logit_rows']} rows a chunk s | "
             "speed-up | largest relative difference of the KL |", "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['batch']} | {row['children']} | {row['before_s']:.3f} | {row['after_s']:.3f} | "
                     f"{row['speedup']:.2f}x | {row['max_relative_difference']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
