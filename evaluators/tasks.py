"""The seven zero-shot tasks of the pruning papers, read from local files and turned into the
exact (context, continuation) requests lm-evaluation-harness 0.4 builds for them.

Our numbers are only comparable with the papers' if every detail matches: the prompt
(``doc_to_text``), the choices (``doc_to_choice``), the target delimiter ``" "``. Each loader reads
one task's local files under ``$LLM_PRUNER_DATA`` (see shared/data/MANIFEST.md for their formats
and quirks); :mod:`evaluators.zeroshot` scores the requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from evaluators.data import DATA_ENV, data_root, local_file
from space.errors import UserError


DELIMITER = " "  # lm-eval's default target_delimiter


@dataclass(frozen=True)
class Example:
    """One document as lm-eval sees it: one (context, continuation) request per choice."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]  # lm-eval's doc_to_choice; their lengths normalise acc_norm
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


def _choice_example(context: str, choices: list[str], gold: int) -> Example:
    """The common case: one context, each choice is a continuation after the delimiter."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside {len(choices)} choices")
    return Example(
        contexts=(context,) * len(choices),
        continuations=tuple(DELIMITER + c for c in choices),
        choices=tuple(choices),
        gold=gold,
    )


# --- reading the local files ---------------------------------------------------------------


def _path(relative: str) -> Path:
    path = local_file(relative)
    if path is None:
        root = data_root()
        where = f"{root}/{relative}" if root else f"${DATA_ENV}/{relative} (${DATA_ENV} is not set)"
        raise UserError(f"zero-shot data file not found: {where}")
    return path


def _lines(relative: str, limit: int | None) -> list[str]:
    """The first ``limit`` non-empty lines (all when None); reading stops early for big files."""
    out = []
    with _path(relative).open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(line.rstrip("\n"))
    return out


def _jsonl(relative: str, limit: int | None) -> list[dict]:
    rows = []
    for number, line in enumerate(_lines(relative, limit), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{relative}, line {number}: not valid JSON ({exc})") from exc
    return rows


def _bool_label(value) -> int:
    """BoolQ labels: JSON booleans in HF/SuperGLUE, the strings "true"/"false" in our copy."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, int) and value in (0, 1):
        return value
    raise ValueError(f"not a BoolQ label: {value!r}")


def _checked(relative: str, rows: list, build: Callable) -> list[Example]:
    """Build examples row by row, naming the file and row of any malformed one."""
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            out.append(build(row))
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise UserError(f"{relative}, example {number}: malformed ({type(exc).__name__}: {exc})") from exc
    return out


# --- one loader per task (prompts as in lm-eval's task YAMLs) -------------------------------


def load_boolq(*, limit: int | None = None) -> list[Example]:
    """super_glue/boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" -> no / yes."""
    relative = "boolq/val.jsonl"

    def build(d: dict) -> Example:
        context = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
        return _choice_example(context, ["no", "yes"], _bool_label(d["label"]))

    return _checked(relative, _jsonl(relative, limit), build)


def load_piqa(*, limit: int | None = None) -> list[Example]:
    """piqa: "Question: {goal}\\nAnswer:" -> sol1 / sol2; labels in a separate file."""
    rows = _jsonl("piqa/valid.jsonl", limit)
    labels = _lines("piqa/valid-labels.lst", limit)
    if len(labels) != len(rows):
        raise UserError(f"piqa: {len(rows)} examples but {len(labels)} labels")

    def build(pair: tuple[dict, str]) -> Example:
        d, label = pair
        return _choice_example(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(label))

    return _checked("piqa/valid.jsonl", list(zip(rows, labels)), build)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow's "[title]" and bracket artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(*, limit: int | None = None) -> list[Example]:
    """hellaswag: "{activity_label}: {ctx_a} {ctx_b.capitalize()}" (cleaned) -> 4 endings."""
    relative = "hellaswag/hellaswag_val.jsonl"

    def build(d: dict) -> Example:
        query = _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        return _choice_example(query, [_hellaswag_clean(e) for e in d["endings"]], int(d["label"]))

    return _checked(relative, _jsonl(relative, limit), build)


def load_winogrande(*, limit: int | None = None) -> list[Example]:
    """winogrande: the context is the sentence up to "_" with each option filled in; the
    continuation is the rest of the sentence, the same for both options (partial scoring)."""
    relative = "winogrande/winogrande_xl_validation.jsonl"

    def build(d: dict) -> Example:
        sentence = d["sentence"]
        blank = sentence.index("_")
        contexts = tuple(sentence[:blank] + option for option in (d["option1"], d["option2"]))
        rest = DELIMITER + sentence[blank + 1 :].strip()
        gold = {"1": 0, "2": 1}[str(d["answer"]).strip()]
        # lm-eval's doc_to_choice for this task *is* the list of contexts.
        return Example(contexts=contexts, continuations=(rest, rest), choices=contexts, gold=gold)

    return _checked(relative, _jsonl(relative, limit), build)


def _arc_loader(relative: str) -> Callable[..., list[Example]]:
    def load(*, limit: int | None = None) -> list[Example]:
        """ai2_arc: "Question: {stem}\\nAnswer:" -> the item's own choices (3, 4 or 5 of them);
        answerKey is looked up in the item's labels, which are letters or digits."""

        def build(d: dict) -> Example:
            question = d["question"]
            labels = [c["label"] for c in question["choices"]]
            texts = [c["text"] for c in question["choices"]]
            return _choice_example(f"Question: {question['stem']}\nAnswer:", texts, labels.index(d["answerKey"]))

        return _checked(relative, _jsonl(relative, limit), build)

    return load


def load_openbookqa(*, limit: int | None = None) -> list[Example]:
    """openbookqa (main, test): the bare question stem -> 4 choices."""
    relative = "openbookqa/test.jsonl"

    def build(d: dict) -> Example:
        labels = list(d["choices"]["label"])
        gold = labels.index(d["answerKey"].lstrip())
        return _choice_example(d["question_stem"], list(d["choices"]["text"]), gold)

    return _checked(relative, _jsonl(relative, limit), build)


TASKS: dict[str, Callable[..., list[Example]]] = {
    "boolq": load_boolq,
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "arc_easy": _arc_loader("arc/ARC-Easy-Test.jsonl"),
    "arc_challenge": _arc_loader("arc/ARC-Challenge-Test.jsonl"),
    "openbookqa": load_openbookqa,
}

# The metrics lm-eval's task configs report, and the one the pruning papers average.
METRICS = {
    "boolq": ("acc",),
    "piqa": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "openbookqa": ("acc", "acc_norm"),
}
HEADLINE = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}


def parse_tasks(spec: str | list[str]) -> list[str]:
    """``"piqa,boolq"`` or a list -> validated task names (``all`` = the seven)."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown zero-shot task(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(TASKS)}")
    return names


def load_task(name: str, *, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples (all when None) of task ``name``."""
    if name not in TASKS:
        raise UserError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive number of examples, got {limit}")
    return TASKS[name](limit=limit)
