"""The osscar order's calibration passes, up to four forms on the same SmolLM2-135M windows side by side in
one run (alternating, the faster of ``--repeats`` each); the scores must be identical:

* ``whole block, three passes``: each layer runs the whole block for the attention statistics, again for
  down_proj's (attention refitted) and again for the outputs (down_proj refitted), as before 2026-12-07;
* ``stopped at o_proj``: the attention statistics' pass stops at o_proj (``space.calibration.input_of``);
* ``one pass for down_proj``: down_proj's statistics and the block's outputs from one pass (the stream after
  attention plus the refitted down_proj on its inputs, ``space/residual_pass.py``), 2026-12-07;
* ``attention replayed``: besides, down_proj's pass replays the attention from the first pass's o_proj
  inputs (the refitted o_proj on them, ``AttentionPass.replayed``): the attention runs once per layer,
  today's form.

    LLM_PRUNER_DATA=../shared/data python experiments/order_passes.py --nsamples 64 --ratio 0.5
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from search.config import STATISTICS_REGION  # noqa: E402
from space import calibration  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space import residual_pass  # noqa: E402
from space.scores import compute_scores  # noqa: E402
from space.scores import osscar  # noqa: E402

RESULTS = Path(__file__).parent / "results"


FORMS = ("whole block, three passes", "stopped at o_proj", "one pass for down_proj", "attention replayed")


def _attention_run_again(*args, attention, **kwargs):
    return residual_pass.last_linear_pass(*args, **kwargs)


def _whole_block_attention_pass(block, attention, output, inputs, *, gram):
    """The attention statistics from a pass through the whole block (``input_of`` patched), nothing held."""
    stats = calibration.linear_input_stats(block, output, inputs, gram=gram)
    return residual_pass.AttentionPass(stats, attention, output, [], None)


def timed_order(adapter, windows: torch.Tensor, ratio: float, form: str, pass_dtype) -> tuple[list, float]:
    """The osscar order in ``form`` (:data:`FORMS`) and its seconds."""
    with ExitStack() as stack:
        if form != FORMS[3]:  # down_proj's pass computes the attention again
            stack.enter_context(mock.patch.object(osscar, "last_linear_pass", _attention_run_again))
        if form in FORMS[:2]:  # the block run again after down_proj's refit
            stack.enter_context(mock.patch.object(adapter, "plain_residual", False))
        if form == FORMS[0]:  # every statistics pass runs the whole block
            stack.enter_context(mock.patch.object(calibration, "input_of",
                                                  functools.partial(calibration.input_of, finish=True)))
            stack.enter_context(mock.patch.object(osscar, "attention_pass", _whole_block_attention_pass))
        started = time.perf_counter()
        scores = compute_scores(adapter, windows, ["osscar"], ratio=ratio, pass_dtype=pass_dtype)["osscar"]
    return scores, time.perf_counter() - started


def identical(a: list, b: list) -> bool:
    return all(torch.equal(x.heads, y.heads) and torch.equal(x.channels, y.channels) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32, help="windows of 512 tokens of WikiText-2 validation")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--pass-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the dtype the blocks run in (the search's default for the order, its --pass-dtype: "
                             "float32)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--forms", type=int, nargs="+", default=list(range(len(FORMS))),
                        help="which forms to run, by index: " + ", ".join(f"{i} {f}" for i, f in enumerate(FORMS)))
    parser.add_argument("--out", type=Path, default=RESULTS / "order_passes.json")
    args = parser.parse_args(argv)
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    windows = CalibrationSpec("wikitext2", args.nsamples, 512, 0, STATISTICS_REGION).windows(loaded.tokenizer)
    forms = [FORMS[i] for i in args.forms]
    seconds: dict[str, list[float]] = {form: [] for form in forms}
    scores = {}
    for _ in range(args.repeats):
        for form in forms:
            scores[form], took = timed_order(adapter, windows, args.ratio, form, getattr(torch, args.pass_dtype))
            seconds[form].append(round(took, 1))
    same = all(identical(scores[forms[0]], scores[form]) for form in forms[1:])
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    best = {form: min(s) for form, s in seconds.items()}
    result = {"command": "python experiments/order_passes.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "nsamples": args.nsamples, "ratio": args.ratio, "pass_dtype": args.pass_dtype, "seconds": seconds,
              "best": best, "speedup": {form: round(best[forms[0]] / best[form], 3) for form in forms},
              "identical_scores": same, **peak, "environment": environment()}
    write_json(args.out, result)
    machine = result["environment"]["machine"]
    lines = [f"# The osscar order's passes ({args.nsamples} x 512 tokens, ratio {args.ratio}, {args.pass_dtype} "
             "passes)", "",
             f"`{result['command']}`. Machine: {machine['cpu']}, {machine['threads']} threads; matmul peak "
             f"bfloat16 {peak['bf16_tflops']:.3f}, float32 {peak['fp32_tflops']:.3f} TFLOP/s in the same run. "
             "Seconds of the whole order (30 layers: passes, greedy eliminations, swap searches).", "",
             f"| form | seconds (each run) | best | against {forms[0]} |", "|---|---|---|---|"]
    lines += [f"| {form} | {' / '.join(f'{s:.1f}' for s in seconds[form])} | {best[form]:.1f} | "
              f"{result['speedup'][form]:.2f}x |" for form in forms]
    lines += ["", f"Scores identical in every form: {'yes' if same else 'NO'}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
