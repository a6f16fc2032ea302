"""The osscar order's calibration passes: each layer's attention statistics with the block stopped at o_proj
(``space.calibration.input_of``, since 2026-12-07) against the whole block run for them, as before, on the same
SmolLM2-135M windows side by side in one run (alternating, the faster of ``--repeats`` each). The scores must
be identical; the table gives the seconds of the whole order.

    LLM_PRUNER_DATA=../shared/data python experiments/order_passes.py --nsamples 32 --ratio 0.6
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from search.config import STATISTICS_REGION  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.calibration import input_of  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.scores import compute_scores  # noqa: E402
from space.scores import osscar  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed_order(adapter, windows: torch.Tensor, ratio: float, whole_block: bool) -> tuple[list, float]:
    """The osscar order and its seconds; ``whole_block``: every statistics pass runs the whole block."""
    patch = mock.patch.object(osscar, "input_of", functools.partial(input_of, finish=True)) if whole_block \
        else nullcontext()
    with patch:
        started = time.perf_counter()
        scores = compute_scores(adapter, windows, ["osscar"], ratio=ratio)["osscar"]
    return scores, time.perf_counter() - started


def identical(a: list, b: list) -> bool:
    return all(torch.equal(x.heads, y.heads) and torch.equal(x.channels, y.channels) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32, help="windows of 512 tokens of WikiText-2 validation")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "order_passes.json")
    args = parser.parse_args(argv)
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    windows = CalibrationSpec("wikitext2", args.nsamples, 512, 0, STATISTICS_REGION).windows(loaded.tokenizer)
    seconds: dict[str, list[float]] = {"stopped at o_proj": [], "whole block": []}
    scores = {}
    for _ in range(args.repeats):
        for name in seconds:
            scores[name], took = timed_order(adapter, windows, args.ratio, name == "whole block")
            seconds[name].append(round(took, 1))
    same = identical(scores["stopped at o_proj"], scores["whole block"])
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    best = {name: min(s) for name, s in seconds.items()}
    result = {"command": "python experiments/order_passes.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "nsamples": args.nsamples, "ratio": args.ratio, "seconds": seconds, "best": best,
              "speedup": round(best["whole block"] / best["stopped at o_proj"], 3), "identical_scores": same,
              **peak, "environment": environment()}
    write_json(args.out, result)
    lines = [f"# The osscar order's passes ({args.nsamples} x 512 tokens, ratio {args.ratio}, float32 passes)", "",
             f"`{result['command']}`. Machine: {result['environment']['machine']['cpu']}, "
             f"{result['environment']['machine']['threads']} threads; float32 matmul peak {peak['fp32_tflops']:.3f} "
             "TFLOP/s in the same run.", "",
             "| attention statistics | seconds (each run) | best |", "|---|---|---|"]
    lines += [f"| {name} | {' / '.join(f'{s:.1f}' for s in runs)} | {best[name]:.1f} |" for name, runs in seconds.items()]
    lines += ["", f"Speed-up {result['speedup']:.2f}x; scores identical: {'yes' if same else 'NO'}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
