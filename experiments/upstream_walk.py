"""The export's upstream least squares (``reform/sequential.py``), two forms on a search's winner side by side
in one run (alternating, the faster of ``--repeats`` each), on the windows, pass dtype and unit selection its
export used; the refitted weights must be identical:

* ``block run again``: each layer's pruned block runs once more for its outputs after down_proj's refit, as
  before 2026-12-07;
* ``from down_proj's pass``: the outputs from down_proj's statistics pass (the stream after attention plus the
  refitted down_proj on the kept channels' inputs, ``space/residual_pass.py``), today's form.

    LLM_PRUNER_DATA=../shared/data python experiments/upstream_walk.py runs/quality/0.5/order256-seed0/export
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from reform.rectify import rectify  # noqa: E402
from reform.spec import ReformSpec  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.export import read_subnet_record, write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.order import orders_from_kept, permute_model  # noqa: E402
from space.subnet import Subnet  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FORMS = ("block run again", "from down_proj's pass")


def timed_rectify(record: dict, form: str) -> tuple[dict, float]:
    """The export's upstream least squares of ``record``'s subnet in ``form`` and its seconds (the model
    loaded and permuted before the clock starts)."""
    recipe = record["recipe"]
    loaded = load_model(record["source"]["path"], dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    orders = orders_from_kept(record["kept"], adapter.dims)
    permute_model(adapter, orders)
    adapter.plain_residual = form == FORMS[1]
    windows = CalibrationSpec.from_dict(recipe["export_calibration"]).windows(loaded.tokenizer)
    started = time.perf_counter()
    overrides = rectify(adapter, Subnet.from_dict(record["subnet"]), windows,
                        spec=ReformSpec(**recipe["compensation"]), orders=orders)
    return overrides, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a search's export folder (its subnet.json says how it was fitted)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "upstream_walk.json")
    args = parser.parse_args(argv)
    record = read_subnet_record(args.export)
    if record["recipe"]["compensation"].get("mode") != "upstream":
        print(f"{args.export}: not rectified in the upstream mode", file=sys.stderr)
        return 2
    seconds: dict[str, list[float]] = {form: [] for form in FORMS}
    overrides = {}
    for _ in range(args.repeats):
        for form in FORMS:
            overrides[form], took = timed_rectify(record, form)
            seconds[form].append(round(took, 1))
    a, b = (overrides[form] for form in FORMS)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    largest = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    best = {form: min(s) for form, s in seconds.items()}
    calibration = record["recipe"]["export_calibration"]
    result = {"command": "python experiments/upstream_walk.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "export": str(args.export), "compensation": record["recipe"]["compensation"],
              "calibration": calibration, "seconds": seconds, "best": best,
              "speedup": round(best[FORMS[0]] / best[FORMS[1]], 3), "identical_weights": same,
              "largest_relative_difference": largest, **peak, "environment": environment()}
    write_json(args.out, result)
    machine = result["environment"]["machine"]
    lines = [f"# The export's upstream least squares ({calibration['nsamples']} x {calibration['seqlen']} tokens of "
             f"{calibration['dataset']}, {record['recipe']['compensation'].get('pass_dtype', 'float32')} passes)", "",
             f"`{result['command']}` (the winner of {record.get('target_ratio')}). Machine: {machine['cpu']}, "
             f"{machine['threads']} threads; matmul peak bfloat16 {peak['bf16_tflops']:.3f}, float32 "
             f"{peak['fp32_tflops']:.3f} TFLOP/s in the same run. Seconds of the whole least squares (30 layers: "
             "passes, solves).", "",
             "| form | seconds (each run) | best |", "|---|---|---|"]
    lines += [f"| {form} | {' / '.join(f'{s:.1f}' for s in seconds[form])} | {best[form]:.1f} |" for form in FORMS]
    lines += ["", f"Speed-up {result['speedup']:.2f}x; refitted weights identical: {'yes' if same else 'NO'} "
              f"(largest difference {largest:.1e} of a weight's largest entry)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
