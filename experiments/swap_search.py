"""OSSCAR's swap search with rank-one updates (space/scores/elimination.py, since 2026-12-07) against the form it
replaced, one k x k factorisation per round and one k x k x (n - k) product per tried removal, loaded from git
revision ``--against``. The problems are real: every layer's down_proj weight, second moment and greedy start as the
osscar order of SmolLM2-135M meets them (statistics of the pruned upstream model, ``--nsamples`` windows of 512 of
WikiText-2 validation's statistics region) at each ``--ratios``. Both forms run on the same problems alternately,
the faster of ``--repeats`` each; their kept sets must be equal.

    LLM_PRUNER_DATA=../shared/data python experiments/swap_search.py --nsamples 32 --ratios 0.5 0.6
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from search.config import STATISTICS_REGION  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.scores import compute_scores, osscar  # noqa: E402
from space.scores.elimination import swap_search  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BEFORE = "9113aab"  # the last revision with a factorisation per round


def swap_search_at(revision: str):
    """``swap_search`` as space/scores/elimination.py defines it at git ``revision``."""
    source = subprocess.run(["git", "show", f"{revision}:space/scores/elimination.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "elimination_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("elimination_before", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module.swap_search


def recorded_problems(adapter, windows: torch.Tensor, ratio: float) -> list[tuple]:
    """(weight, H, start) of every swap search the osscar order runs at ``ratio``."""
    problems = []

    def record(weight, h, start, **options):
        problems.append((weight.clone(), h.clone(), start.clone()))
        return swap_search(weight, h, start, **options)

    with mock.patch.object(osscar, "swap_search", record):
        compute_scores(adapter, windows, ["osscar"], ratio=ratio)
    return problems


def timed(search, problems: list[tuple]) -> tuple[float, list, int]:
    started = time.perf_counter()
    results = [search(weight, h, start) for weight, h, start in problems]
    return time.perf_counter() - started, [r.kept.tolist() for r in results], sum(r.accepted for r in results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32, help="windows of 512 tokens of WikiText-2 validation")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--against", default=BEFORE, help="git revision of the form compared with")
    parser.add_argument("--out", type=Path, default=RESULTS / "swap_search.json")
    args = parser.parse_args(argv)
    forms = {"rank-one updates": swap_search, f"factorisation per round ({args.against})": swap_search_at(args.against)}
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    windows = CalibrationSpec("wikitext2", args.nsamples, 512, 0, STATISTICS_REGION).windows(loaded.tokenizer)
    rows = []
    for ratio in args.ratios:
        problems = recorded_problems(adapter, windows, ratio)
        seconds: dict[str, list[float]] = {name: [] for name in forms}
        kept, swaps = {}, {}
        for _ in range(args.repeats):
            for name, search in forms.items():
                took, kept[name], swaps[name] = timed(search, problems)
                seconds[name].append(round(took, 2))
        new, old = forms
        rows.append({"ratio": ratio, "layers": len(problems), "kept": int(problems[0][2].numel()),
                     "width": int(problems[0][0].shape[1]), "swaps": swaps[new], "seconds": seconds,
                     "speedup": round(min(seconds[old]) / min(seconds[new]), 2), "same_kept": kept[new] == kept[old]})
    peak = {"fp32_tflops": matmul_tflops(torch.float32)}
    result = {"command": "python experiments/swap_search.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "nsamples": args.nsamples, "rows": rows, **peak, "environment": environment()}
    write_json(args.out, result)
    machine = result["environment"]["machine"]
    lines = [f"# OSSCAR's swap search: rank-one updates against a factorisation per round ({args.nsamples} x 512 "
             "tokens of statistics)", "", f"`{result['command']}`. Machine: {machine['cpu']}, {machine['threads']} "
             f"threads; float32 matmul peak {peak['fp32_tflops']:.3f} TFLOP/s in the same run. Seconds of every "
             "layer's swap search (float64), each run; the order's passes are not in them.", "",
             "| ratio | layers | kept of width | swaps | " + " | ".join(forms) + " | speed-up | same kept sets |",
             "|---|---|---|---|" + "---|" * len(forms) + "---|---|"]
    for row in rows:
        times = " | ".join(" / ".join(f"{s:.2f}" for s in row["seconds"][name]) for name in forms)
        lines.append(f"| {row['ratio']} | {row['layers']} | {row['kept']} of {row['width']} | {row['swaps']} | {times} "
                     f"| {row['speedup']:.1f}x | {'yes' if row['same_kept'] else 'NO'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(row["same_kept"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
