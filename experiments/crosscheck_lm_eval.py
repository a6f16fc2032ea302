"""Cross-check the built-in scorer ``evaluators.zeroshot`` against the lm-eval backend, offline.

Both see the same model object and the same local files in $LLM_PRUNER_DATA. The backend
(``evaluators.harness``) drives lm-eval with its *own* task definitions, overriding only where the
documents come from, and rewrites our rows into the HF layout independently of the built-in
scorer's loaders (``evaluators.tasks``), so a mistake in a loader cannot cancel out. This decides
whether the built-in scorer can go: the backend must agree within 0.5 points per task.

Reports per task both scores, their difference, how many examples got a different prediction,
and the largest per-choice log-likelihood difference.

    LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/crosscheck_lm_eval.py \\
        --limit 500 --dtype float32 --json experiments/results/crosscheck_lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators import harness, zeroshot  # noqa: E402
from evaluators.environment import environment  # noqa: E402
from experiments.eval_exports import load_for_eval  # noqa: E402


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | None, batch_size: int) -> dict:
    """lm-eval's metrics and per-example log-likelihoods through our backend, task -> {"metrics", "lls"}."""
    out, names = harness.run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=batch_size, log_samples=True)
    results = {}
    for task, name in names.items():
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        metrics = {k.split(",")[0]: v for k, v in out["results"][name].items() if k.endswith(",none")}
        results[task] = {"metrics": metrics, "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}
    return results


def compare(task: str, ours: dict, our_lls: list[list[float]], theirs: dict, examples) -> dict:
    """Score difference, prediction disagreements and the largest log-likelihood gap for one task."""
    metric = zeroshot.HEADLINE[task]
    their_lls = theirs["lls"]
    if len(their_lls) != len(our_lls):
        raise SystemExit(f"{task}: lm-eval scored {len(their_lls)} examples, we scored {len(our_lls)}")
    flipped = [
        i for i, (e, a, b) in enumerate(zip(examples, our_lls, their_lls))
        if zeroshot.predictions(e, a)[metric] != zeroshot.predictions(e, b)[metric]
    ]
    gap = max(abs(x - y) for a, b in zip(our_lls, their_lls) for x, y in zip(a, b, strict=True))
    return {
        "metric": metric,
        "ours": ours[metric],
        "lm_eval": theirs["metrics"][metric],
        "diff_points": 100 * (ours[metric] - theirs["metrics"][metric]),
        "n": len(our_lls),
        "prediction_flips": len(flipped),
        "flipped_examples": flipped,
        "max_abs_ll_diff": gap,
        "ours_all": {k: ours[k] for k in zeroshot.METRICS[task]},
        "lm_eval_all": {k: theirs["metrics"].get(k) for k in zeroshot.METRICS[task]},
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    parser.add_argument("--limit", type=int, default=500, help="first N examples per task (0 = all)")
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=Path("experiments/results/crosscheck_lm_eval.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = zeroshot.parse_tasks(args.tasks)
    limit = args.limit or None
    started = time.time()
    torch.manual_seed(0)
    model, tokenizer, source = load_for_eval(args.model, dtype=getattr(torch, args.dtype))
    rows, timings = {}, {}
    ours = {}
    for task in tasks:
        t0 = time.time()
        examples = zeroshot.load_task(task, limit=limit)
        lls = zeroshot.task_loglikelihoods(model, tokenizer, examples, batch_size=args.batch_size)
        ours[task] = (examples, lls, zeroshot.score_task(task, examples, lls))
        timings[f"ours_{task}_s"] = time.time() - t0
        print(f"ours {task}: {ours[task][2]}", flush=True)
    t0 = time.time()
    theirs = run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size)
    timings["lm_eval_s"] = time.time() - t0
    for task in tasks:
        examples, lls, metrics = ours[task]
        rows[task] = compare(task, metrics, lls, theirs[task], examples)
        print(f"{task}: {json.dumps(rows[task])}", flush=True)
    report = {
        "what": "evaluators.zeroshot (built-in scorer) vs evaluators.harness (lm-eval backend) on the same local examples and model object",
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "tasks": tasks},
        "model": source,
        "seed": 0,
        "environment": environment(),
        "tasks": rows,
        "max_abs_diff_points": max(abs(r["diff_points"]) for r in rows.values()),
        "timings_s": timings,
        "wall_time_s": time.time() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}; largest difference {report['max_abs_diff_points']:.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
