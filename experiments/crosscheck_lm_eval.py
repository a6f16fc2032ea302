"""Cross-check ``evaluators.zeroshot`` against the lm-evaluation-harness package, offline.

Both scorers see the same model object and the same local files in $LLM_PRUNER_DATA. lm-eval is
driven with its *own* task definitions: for each task a small YAML in a temporary folder
``include``s lm-eval's installed YAML (prompt, choices, preprocessing, metrics) and overrides only
where the documents come from (``dataset_path: json`` + ``data_files``). Where our file layout
differs from the Hugging Face one lm-eval expects (PIQA labels in a separate file, ARC's nested
question, BoolQ's string labels), this script rewrites the rows into the HF layout, independently
of our loaders, so a mistake in a loader cannot cancel out.

Reports per task both scores, their difference, how many examples got a different prediction,
and the largest per-choice log-likelihood difference.

    LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/crosscheck_lm_eval.py \\
        --limit 500 --dtype bfloat16 --json experiments/results/crosscheck_lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators import zeroshot  # noqa: E402
from evaluators.data import local_file  # noqa: E402
from evaluators.environment import environment  # noqa: E402
from experiments.eval_exports import load_for_eval  # noqa: E402

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


# --- our local files -> the Hugging Face row layout lm-eval's YAMLs read --------------------


def _rows(relative: str) -> list[dict]:
    with local_file(relative).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _piqa() -> list[dict]:
    labels = local_file("piqa/valid-labels.lst").read_text().split()
    return [{**row, "label": int(label)} for row, label in zip(_rows("piqa/valid.jsonl"), labels, strict=True)]


def _arc(relative: str) -> list[dict]:
    return [
        {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in row["question"]["choices"]],
                "label": [c["label"] for c in row["question"]["choices"]],
            },
            "answerKey": row["answerKey"],
        }
        for row in _rows(relative)
    ]


def _boolq() -> list[dict]:
    # HF super_glue/boolq: label 0 = False, 1 = True; our copy has the strings "false"/"true".
    return [{**row, "label": {"false": 0, "true": 1}[str(row["label"]).lower()]} for row in _rows("boolq/val.jsonl")]


# task -> (lm-eval YAML to include, split the task evaluates, rows in HF layout)
SOURCES = {
    "boolq": ("super_glue/boolq/default.yaml", "validation", _boolq),
    "piqa": ("piqa/piqa.yaml", "validation", _piqa),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", lambda: _rows("hellaswag/hellaswag_val.jsonl")),
    "winogrande": ("winogrande/default.yaml", "validation",
                   lambda: _rows("winogrande/winogrande_xl_validation.jsonl")),
    "arc_easy": ("arc/arc_easy.yaml", "test", lambda: _arc("arc/ARC-Easy-Test.jsonl")),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", lambda: _arc("arc/ARC-Challenge-Test.jsonl")),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", lambda: _rows("openbookqa/test.jsonl")),
}


def write_task_configs(folder: Path, tasks: list[str]) -> dict[str, str]:
    """One data file and one YAML per task in ``folder``; returns task -> lm-eval task name."""
    import yaml

    names = {}
    for task in tasks:
        include, split, rows = SOURCES[task]
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()), encoding="utf-8")
        name = f"xcheck_{task}"
        config = {
            "include": str(LM_EVAL_TASKS / include),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names[task] = name
    return names


def run_lm_eval(
    model, tokenizer, tasks: list[str], *, limit: int | None, batch_size: int, softmax_dtype: str | None = None
) -> dict:
    """lm-eval's metrics and per-example log-likelihoods, task -> {"metrics", "lls"}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="xcheck_tasks_") as tmp:
        names = write_task_configs(Path(tmp), tasks)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
                  softmax_dtype=softmax_dtype)
        out = simple_evaluate(
            model=lm, tasks=list(names.values()), num_fewshot=0, limit=limit, log_samples=True,
            task_manager=TaskManager(include_path=tmp), bootstrap_iters=0,
        )
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
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lm-eval-softmax-dtype", default=None, choices=("float32",),
                        help="lm-eval's log-softmax dtype (default: the model's, as lm-eval does)")
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
    theirs = run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size,
                         softmax_dtype=args.lm_eval_softmax_dtype)
    timings["lm_eval_s"] = time.time() - t0
    for task in tasks:
        examples, lls, metrics = ours[task]
        rows[task] = compare(task, metrics, lls, theirs[task], examples)
        print(f"{task}: {json.dumps(rows[task])}", flush=True)
    report = {
        "what": "evaluators.zeroshot vs lm-evaluation-harness on the same local examples and model object",
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
