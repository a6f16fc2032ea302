"""How much of a winner's quality rides on the unit order's rounding: a finished search's winner (its
widths) exported again with its own unit order and with orders computed again on the same windows
under changes that move nothing but rounding, or the passes' dtype:

* ``own order``: the run folder's order (from the score cache), through the same export path: a check
  that the path gives back the search's own export;
* ``float32, batches of 4``: the search's float32 passes with 4 windows a batch instead of 8 (other
  kernel shapes, other summation orders: float32 rounding and nothing else);
* ``bfloat16 passes``: the passes in bfloat16 (``--pass-dtype bfloat16``), the candidate time saving.

Each is refitted as the search's export was and measured on PTB validation (8 windows of 2048, float32),
the text decisions are read from; beside it the share of the winner's kept channels the order keeps too
and the order's seconds. Prints a table and writes JSON.

    LLM_PRUNER_DATA=../shared/data python experiments/order_noise.py runs/quality/0.5/order256-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.environment import environment, matmul_tflops  # noqa: E402
from experiments.outputs import command_line, write_results  # noqa: E402
from experiments.pass_dtype import end_to_end, shares  # noqa: E402
from experiments.quality import validation_ppl  # noqa: E402
from search.prepare import dense_scores  # noqa: E402
from search.rundir import load_run_config  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.export import read_subnet_record  # noqa: E402
from space.models import load_model  # noqa: E402
from space.scores import compute_scores  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"own order": None, "float32, batches of 4": (None, 4), "bfloat16 passes": (torch.bfloat16, 8)}


def order(config, variant: tuple | None) -> tuple[list, float]:
    """The unit order of ``config`` computed again as ``variant`` says (None: the run's own, cached) and its
    seconds (the cached order's: as computed then)."""
    loaded = load_model(config.model, dtype=torch.float32)
    calibration = config.order_calibration_spec()
    if variant is None:
        scored = dense_scores(loaded, [config.importance], calibration, ratio=config.ratio)
        return scored.scores[config.importance], scored.seconds
    pass_dtype, batch_size = variant
    started = time.perf_counter()
    scores = compute_scores(adapter_for(loaded.model), calibration.windows(loaded.tokenizer), [config.importance],
                            ratio=config.ratio, pass_dtype=pass_dtype, batch_size=batch_size)[config.importance]
    return scores, time.perf_counter() - started


def cell(run_dir: Path) -> dict:
    config = load_run_config(run_dir)
    export = Path(json.loads((run_dir / "best.json").read_text())["export"])
    own = read_subnet_record(export)["kept"]
    rows = {}
    for name, variant in VARIANTS.items():
        scores, seconds = order(config, variant)
        rebuilt = end_to_end(export, config, scores, measured=lambda folder: validation_ppl(str(folder)))
        channels = shares(own, rebuilt["kept"], "channels")
        rows[name] = {"order_s": round(seconds, 1), "ptb_validation": rebuilt["ppl"],
                      "channels_kept_share": channels, "heads_kept_share": shares(own, rebuilt["kept"], "heads")}
        print(name, json.dumps({k: v for k, v in rows[name].items() if "share" not in k}), flush=True)
    return {"run_dir": str(run_dir), "export": str(export), "pass_dtype": config.pass_dtype,
            "order_windows": config.order_calibration_spec().to_dict(), "variants": rows}


def report(data: dict) -> str:
    machine = data["environment"]["machine"]
    lines = ["# The unit order's rounding and a winner's quality", "",
             f"`{data['command']}`. Machine: {machine['cpu']}, {machine['threads']} threads; matmul peak bfloat16 "
             f"{data['bf16_tflops']:.3f}, float32 {data['fp32_tflops']:.3f} TFLOP/s in the same run. The winner's "
             "widths exported with each order (its least squares, text and windows), PTB validation (8 x 2048).", "",
             "| run | order | order s | kept channels shared with the winner's (mean / min) | heads shared (min) "
             "| PTB validation | vs own order |", "|---|---|---|---|---|---|---|"]
    for run in data["cells"].values():
        own = run["variants"]["own order"]["ptb_validation"]
        for name, row in run["variants"].items():
            channels = row["channels_kept_share"]
            lines.append(f"| {run['run_dir']} | {name} | {row['order_s']:.0f} | {sum(channels) / len(channels):.4f}"
                         f" / {min(channels):.4f} | {min(row['heads_kept_share']):.3f} | {row['ptb_validation']:.2f} "
                         f"| {100 * (row['ptb_validation'] / own - 1):+.1f} % |")
    lines += ["", "The own order's seconds are what the search recorded when it computed it; the others are "
              "measured here."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", help="finished searches with float32 passes")
    parser.add_argument("--out", type=Path, default=RESULTS / "order_noise.json")
    args = parser.parse_args(argv)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"cells": {}}
    data.update(command=command_line(__file__, argv), environment=environment(),
                bf16_tflops=matmul_tflops(torch.bfloat16), fp32_tflops=matmul_tflops(torch.float32))
    for run_dir in args.run_dirs:
        data["cells"][str(run_dir)] = cell(run_dir)
        write_results(args.out, data, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
