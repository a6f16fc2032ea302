"""The scoring dtype on this CPU: seconds per candidate and the fitness values in float32 and bfloat16,
side by side in one run (the default ``--dtype auto``: search/config.py ``default_dtype``).

SmolLM2-135M permuted by wanda-sp with the fitness's float32 prefix solvers, as a search worker holds
them, once in each dtype. Candidates: the staged evolution's children at ``--ratio`` (level switches
of the search's first start: throughput.py's), each scored with the default KL fitness on the staged
evolution's first stage (1 x 512 tokens of the fitness region), its least squares solved first (the
solves are float32 in both), the two dtypes alternating which goes first. The dense reference of each
dtype is computed once, as a search does. Beside them, the matmul peak of both dtypes (1024², best of
2 s) in the same run. Prints a table and writes JSON.

    LLM_PRUNER_DATA=../shared/data python experiments/scoring_dtype.py --children 6
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, fast_bfloat16, matmul_tflops  # noqa: E402
from experiments.outputs import command_line  # noqa: E402
from experiments.fitness_rank import permuted_smollm2, spearman  # noqa: E402
from experiments.throughput import children  # noqa: E402
from reform.local import output_solvers  # noqa: E402
from search.cli.common import parse_args_with_config  # noqa: E402
from search.config import FITNESS_REGION  # noqa: E402
from search.defaults import default_dtype  # noqa: E402
from search.fitness import Fitness  # noqa: E402
from search.prepare import PREFIX_ONLY  # noqa: E402
from search.widths import WidthSpace  # noqa: E402
from space.export import write_json  # noqa: E402
from space.export.atomic import write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scoring_dtype.json")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    adapter, tokenizer, ordered, calibration = permuted_smollm2()
    solvers = output_solvers(adapter, calibration, precompute=torch.float32, prefix_only=PREFIX_ONLY)
    pool = children(WidthSpace(adapter.dims, preset="wide"), ordered, args.ratio, args.children, args.seed)
    windows = CalibrationSpec("wikitext2", 1, 512, 1, FITNESS_REGION).windows(tokenizer)
    peak = {name: matmul_tflops(dtype, size=1024) for name, dtype in DTYPES.items()}
    fitness, reference_s = {}, {}
    for name, dtype in DTYPES.items():
        held = copy.deepcopy(adapter)
        held.model.to(dtype)
        t0 = time.perf_counter()
        fitness[name] = Fitness(held, windows, solvers=solvers, kind="kl")  # the dense reference: one pass
        reference_s[name] = time.perf_counter() - t0
    rows = []
    for i, child in enumerate(pool):
        row = {}
        for name in (list(DTYPES) if i % 2 == 0 else list(reversed(DTYPES))):
            t0 = time.perf_counter()
            value = fitness[name].evaluate(child).value
            row[name] = {"value": value, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(i, {k: (round(v["value"], 4), round(v["seconds"], 2)) for k, v in row.items()}, flush=True)
    data = {"ratio": args.ratio, "children": len(pool), "peak_tflops": peak, "reference_s": reference_s,
            "rows": rows, "fast_bfloat16": fast_bfloat16("cpu"), "auto_dtype": default_dtype("cpu"),
            "seconds": round(time.time() - started, 1), "environment": environment(),
            "command": command_line(__file__, argv)}
    write_json(args.out, data)
    write_text(args.out.with_suffix(".md"), report(data))
    print(report(data))
    return 0


def report(data: dict) -> str:
    machine = data["environment"]["machine"]
    rows = data["rows"]
    median = {name: statistics.median(r[name]["seconds"] for r in rows) for name in DTYPES}
    values = {name: [r[name]["value"] for r in rows] for name in DTYPES}
    lines = ["# The scoring dtype on this CPU (SmolLM2-135M, one worker)", "", __doc__.split("\n\n")[1], "",
             f"`{data['command']}` ({data['seconds']:.0f} s; {machine['cpu']}, capability "
             f"{machine.get('cpu_capability', '?')}, {machine['threads']} threads). `--dtype auto` resolves to "
             f"**{data['auto_dtype']}** here.", "",
             "| dtype | matmul peak TFLOP/s (1024²) | dense reference s | seconds per candidate (median) |",
             "|---|---|---|---|"]
    for name in DTYPES:
        lines.append(f"| {name} | {data['peak_tflops'][name]:.4f} | {data['reference_s'][name]:.2f} | "
                     f"{median[name]:.2f} |")
    lines += ["", f"bfloat16 / float32 seconds per candidate: **{median['bfloat16'] / median['float32']:.2f}x**; "
              f"peak ratio {data['peak_tflops']['bfloat16'] / data['peak_tflops']['float32']:.3f}. "
              f"The fitness (KL) of the {data['children']} children, float32 against bfloat16: Spearman "
              f"{spearman(values['float32'], values['bfloat16']):.2f}, largest relative difference "
              f"{max(abs(a - b) / a for a, b in zip(values['float32'], values['bfloat16'])):.1%}.", "",
              "| child | KL float32 | KL bfloat16 | s float32 | s bfloat16 |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['float32']['value']:.4f} | {r['bfloat16']['value']:.4f} | "
                     f"{r['float32']['seconds']:.2f} | {r['bfloat16']['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
