"""Zero-shot evaluation through lm-evaluation-harness, offline for the seven tasks of the papers.

lm-eval scores every task with its own definitions (prompt, choices, metrics): its ``HFLM`` wraps
our model object as it is (dtype, device, exported class). The seven tasks of the pruning papers
run from the local files in ``$LLM_PRUNER_DATA``: for each, a small YAML in a temporary folder
``include``s lm-eval's installed task YAML and overrides only where the documents come from
(``dataset_path: json`` + ``data_files``). Where our copies' layout differs from the Hugging Face
one lm-eval's YAMLs read (PIQA's labels in a separate file, ARC's nested question, BoolQ's string
labels), the rows are rewritten into the HF layout. Any other lm-eval task or group name (MMLU,
GSM8K, ...) goes to lm-eval unchanged and needs its dataset in the Hugging Face cache or a network.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from evaluators.data import local_file
from space.errors import UserError

log = logging.getLogger(__name__)

# The metric each of the seven tasks contributes to the papers' average.
HEADLINE = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}
TASKS = tuple(HEADLINE)
LOCAL_PREFIX = "llm_pruner_"  # our local variants' names inside lm-eval (its own names stay its own)
# lm-eval's log-softmax runs in the model's dtype by default; bfloat16 over a 49k vocabulary flips
# close choices, so it is always float32 here (an lm-eval option, its numbers all the same).
SOFTMAX_DTYPE = "float32"


# --- our local files -> the Hugging Face row layout lm-eval's YAMLs read --------------------


def _rows(relative: str, limit: int | None = None) -> list[dict]:
    path = local_file(relative)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}, line {number}: not valid JSON ({exc})") from exc
    return rows


def _piqa(limit):
    rows = _rows("piqa/valid.jsonl", limit)
    labels = local_file("piqa/valid-labels.lst").read_text().split()[: len(rows)]
    if len(labels) != len(rows):
        raise UserError(f"piqa: {len(rows)} examples but {len(labels)} labels")
    return [{**row, "label": int(label)} for row, label in zip(rows, labels)]


def _arc(relative: str) -> Callable:
    def rows(limit):
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
            for row in _rows(relative, limit)
        ]

    return rows


def _boolq_label(value) -> int:
    # HF super_glue/boolq: 0 = False, 1 = True; our copy has "false"/"true", others JSON booleans.
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise UserError(f"boolq: not a label: {value!r}")


def _boolq(limit):
    return [{**row, "label": _boolq_label(row["label"])} for row in _rows("boolq/val.jsonl", limit)]


# task -> (lm-eval YAML to include, the split it evaluates, our local file, rows in HF layout)
SOURCES: dict[str, tuple[str, str, str, Callable]] = {
    "boolq": ("super_glue/boolq/default.yaml", "validation", "boolq/val.jsonl", _boolq),
    "piqa": ("piqa/piqa.yaml", "validation", "piqa/valid.jsonl", _piqa),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "hellaswag/hellaswag_val.jsonl",
                  lambda limit: _rows("hellaswag/hellaswag_val.jsonl", limit)),
    "winogrande": ("winogrande/default.yaml", "validation", "winogrande/winogrande_xl_validation.jsonl",
                   lambda limit: _rows("winogrande/winogrande_xl_validation.jsonl", limit)),
    "arc_easy": ("arc/arc_easy.yaml", "test", "arc/ARC-Easy-Test.jsonl", _arc("arc/ARC-Easy-Test.jsonl")),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "arc/ARC-Challenge-Test.jsonl",
                      _arc("arc/ARC-Challenge-Test.jsonl")),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", "openbookqa/test.jsonl",
                   lambda limit: _rows("openbookqa/test.jsonl", limit)),
}


def local_rows(task: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` documents of one of the seven tasks, in the HF layout."""
    return SOURCES[task][3](limit)


def is_local(task: str) -> bool:
    """Whether ``task`` is one of the seven and its file is in ``$LLM_PRUNER_DATA``."""
    return task in SOURCES and local_file(SOURCES[task][2]) is not None


def _lm_eval_tasks_folder() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_local_tasks(folder: Path, tasks: list[str], limit: int | None) -> dict[str, str]:
    """One data file and one YAML per local task in ``folder``; returns task -> lm-eval name."""
    import yaml

    names = {}
    for task in tasks:
        include, split, _, _ = SOURCES[task]
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in local_rows(task, limit)),
                        encoding="utf-8")
        name = LOCAL_PREFIX + task
        config = {
            "include": str(_lm_eval_tasks_folder() / include),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            # the json builder's Arrow cache goes with the folder, not into ~/.cache for every run
            "dataset_kwargs": {"data_files": {split: str(data)}, "cache_dir": str(folder / "cache")},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names[task] = name
    return names


# --- task names ------------------------------------------------------------------------------


def parse_tasks(spec: str | list[str]) -> list[str]:
    """``"piqa,mmlu"`` or a list -> task names (``all`` = the seven). Names other than the seven
    are checked against lm-eval's task index (a few seconds), so a typo fails before any model loads."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if [n.lower() for n in names] == ["all"]:
        return list(TASKS)
    if not names:
        raise UserError("no zero-shot task given; give lm-eval task names, or all for the seven of the papers")
    names = [n.lower() if n.lower() in HEADLINE else n for n in names]
    others = [n for n in names if n not in HEADLINE]
    if others:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [n for n in others if n not in known]
        if unknown:
            raise UserError(f"unknown zero-shot task(s) {', '.join(unknown)}: not one of the seven "
                            f"({', '.join(TASKS)}) nor an lm-eval task or group name")
    return names


# --- running lm-eval ---------------------------------------------------------------------------


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                log_samples: bool = False) -> tuple[dict, dict[str, str]]:
    """lm-eval's ``simple_evaluate`` output for ``tasks`` (zero-shot) and task -> its lm-eval name."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive number of examples, got {limit}")
    local = [t for t in tasks if is_local(t)]
    with tempfile.TemporaryDirectory(prefix="llm_pruner_tasks_") as tmp:
        names = write_local_tasks(Path(tmp), local, limit)
        names.update({t: t for t in tasks if t not in names})
        # Only our folder is indexed when every task is local: lm-eval's whole index takes seconds.
        manager = TaskManager(include_path=tmp, include_defaults=len(local) < len(tasks))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=str(next(model.parameters()).device), softmax_dtype=SOFTMAX_DTYPE)
        out = simple_evaluate(model=lm, tasks=[names[t] for t in tasks], num_fewshot=0, limit=limit,
                              log_samples=log_samples, task_manager=manager, bootstrap_iters=1000)
    return out, names


def _metrics(raw: dict) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` -> values and standard errors by metric
    (a filter other than ``none`` stays in the name: ``exact_match,strict-match``)."""
    values, errors = {}, {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        if metric.endswith("_stderr"):
            errors[name.replace("_stderr", "", 1)] = float(value)
        else:
            values[name] = float(value)
    return values, errors


def headline_metric(task: str, metrics: dict[str, float]) -> str:
    """The metric a task contributes to the average: the papers' choice for the seven, else the
    first of acc_norm, acc, exact_match, ... that lm-eval reports."""
    if task in HEADLINE:
        return HEADLINE[task]
    for preferred in ("acc_norm", "acc", "exact_match,strict-match", "exact_match", "f1", "mcc"):
        if preferred in metrics:
            return preferred
    return sorted(metrics)[0]


def evaluate_zeroshot(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 16) -> dict:
    """Score ``model`` on ``tasks`` through lm-eval (its own progress bars); the average uses each
    task's headline metric. The model is used as given (dtype, device): pass a bfloat16 model for
    bfloat16 scoring.
    """
    names = parse_tasks(tasks)
    was_training = model.training
    model.eval()
    try:
        out, lm_names = run_lm_eval(model, tokenizer, names, limit=limit, batch_size=batch_size)
    finally:
        model.train(was_training)
    results = {}
    for task in names:
        raw = out.get("groups", {}).get(lm_names[task]) or out["results"][lm_names[task]]
        values, errors = _metrics(raw)
        metric = headline_metric(task, values)
        samples = out.get("n-samples", {}).get(lm_names[task], {}).get("effective")
        stderr = errors.get(metric)
        results[task] = {**values, "n": samples, "metric": metric,
                         "stderr": stderr if stderr is not None else float("nan")}
        log.info("zero-shot %s: %s %.4f", task, metric, values[metric])
    average = sum(r[r["metric"]] for r in results.values()) / len(results)
    return {
        "zeroshot": results,
        "zeroshot_avg": average,
        "zeroshot_avg_metrics": {task: r["metric"] for task, r in results.items()},
        "zeroshot_config": {"limit": limit, "batch_size": batch_size, "num_fewshot": 0, "backend": "lm-eval",
                            "lm_eval": _lm_eval_version(), "softmax_dtype": SOFTMAX_DTYPE,
                            "local_tasks": [t for t in names if is_local(t)],
                            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
    }


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")

