"""The osscar order with its second moments' products in float32 against oneDNN's bfloat16 path
(``space.input_stats.bfloat16_products``: the pass's bfloat16 inputs, float32 accumulation and output),
on the same SmolLM2-135M windows, alternating which goes first. Reports the order's seconds, the kept
channels the two share at the uniform target widths, the order's own objective (the refit error of every
layer's kept channels after the swap search, summed), and the products' throughput, with the matmul peaks
of the same run. Prints a table and writes JSON.

    LLM_PRUNER_DATA=../shared/data python experiments/gram_products.py --nsamples 256 --ratio 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from experiments.outputs import command_line, write_results  # noqa: E402
from search.config import STATISTICS_REGION  # noqa: E402
from space import input_stats  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.models import load_model  # noqa: E402
from space.scores import compute_scores, osscar  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PRODUCTS = ("float32", "bfloat16 path")


def timed_order(adapter, windows: torch.Tensor, ratio: float, product: str) -> dict:
    """The osscar order with the gram products of ``product``: its scores, seconds and refit errors."""
    errors: list[float] = []

    def recorded_swap_search(*args, **kwargs):
        swaps = swap_search(*args, **kwargs)
        errors.append(swaps.error)
        return swaps

    swap_search = osscar.swap_search
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(osscar, "swap_search", recorded_swap_search))
        if product == "float32":
            stack.enter_context(mock.patch.object(input_stats, "bfloat16_products",
                                                  lambda exact: contextlib.nullcontext()))
        started = time.perf_counter()
        scores = compute_scores(adapter, windows, ["osscar"], ratio=ratio, pass_dtype=torch.bfloat16)["osscar"]
    return {"scores": scores, "seconds": time.perf_counter() - started, "refit_error": sum(errors)}


def product_seconds(tokens: int, width: int, repeats: int = 8) -> dict[str, float]:
    """Seconds of one batch's gram (``tokens`` x ``width`` bfloat16 values held in float32), each path."""
    x = torch.randn(tokens, width).to(torch.bfloat16).float()
    seconds = {}
    for product in PRODUCTS:
        with input_stats.bfloat16_products(product != "float32"):
            x.T @ x
            started = time.perf_counter()
            for _ in range(repeats):
                x.T @ x
            seconds[product] = (time.perf_counter() - started) / repeats
    return seconds


def kept_shared(a: torch.Tensor, b: torch.Tensor, width: int) -> float:
    top = lambda scores: set(torch.argsort(scores, descending=True, stable=True)[:width].tolist())  # noqa: E731
    return len(top(a) & top(b)) / width


def report(data: dict) -> str:
    machine = data["environment"]["machine"]
    runs = data["orders"]
    lines = [f"# The osscar order's gram products: float32 or oneDNN's bfloat16 path ({data['nsamples']} x 512 "
             f"tokens, ratio {data['ratio']})", "",
             f"`{data['command']}`. Machine: {machine['cpu']}, {machine['threads']} threads; matmul peak bfloat16 "
             f"{data['bf16_tflops']:.3f}, float32 {data['fp32_tflops']:.3f} TFLOP/s in the same run. Passes in "
             "bfloat16 (`--pass-dtype bfloat16`; the search's own default is float32, the export's bfloat16 where "
             "it is fast), so the products' inputs are bfloat16 values either way.", "",
             "| products | order seconds (each run) | refit error, summed over layers | one batch's gram s "
             f"({data['batch_tokens']} x {data['width']}) |", "|---|---|---|---|"]
    for product in PRODUCTS:
        lines.append(f"| {product} | {' / '.join(f'{s:.1f}' for s in runs[product]['seconds'])} | "
                     f"{runs[product]['refit_error']:.6g} | {data['product_seconds'][product]:.4f} |")
    shared = data["kept_channels_shared"]
    lines += ["", f"Kept channels shared at the uniform target widths: mean {sum(shared) / len(shared):.4f}, "
              f"min {min(shared):.4f} (30 layers); head orders identical in "
              f"{data['head_orders_identical']} of {len(shared)} layers."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=64, help="windows of 512 tokens of WikiText-2 validation")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "gram_products.json")
    args = parser.parse_args(argv)
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    windows = CalibrationSpec("wikitext2", args.nsamples, 512, 0, STATISTICS_REGION).windows(loaded.tokenizer)
    runs = {product: {"seconds": []} for product in PRODUCTS}
    scores = {}
    for repeat in range(args.repeats):
        for product in PRODUCTS[::-1] if repeat % 2 else PRODUCTS:
            run = timed_order(adapter, windows, args.ratio, product)
            scores[product] = run["scores"]
            runs[product]["seconds"].append(round(run["seconds"], 1))
            runs[product]["refit_error"] = run["refit_error"]
    target = osscar.uniform_target(adapter.dims, args.ratio)
    a, b = (scores[product] for product in PRODUCTS)
    batch_tokens, width = 8 * 512, adapter.dims.intermediate_size
    data = {"command": command_line(__file__, argv), "nsamples": args.nsamples, "ratio": args.ratio,
            "orders": runs, "kept_channels_shared": [kept_shared(x.channels, y.channels, w.channels)
                                                     for x, y, w in zip(a, b, target.layers)],
            "head_orders_identical": sum(torch.equal(torch.argsort(x.heads, stable=True),
                                                     torch.argsort(y.heads, stable=True)) for x, y in zip(a, b)),
            "batch_tokens": batch_tokens, "width": width, "product_seconds": product_seconds(batch_tokens, width),
            "bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32),
            "environment": environment()}
    write_results(args.out, data, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
