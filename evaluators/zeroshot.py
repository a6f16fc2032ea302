"""Zero-shot multiple-choice tasks, scored the way lm-evaluation-harness scores them.

The pruning papers report seven tasks through lm-evaluation-harness (lm-eval); our numbers are
only comparable with theirs if every detail matches: the prompt (``doc_to_text``), the choices
(``doc_to_choice``), the target delimiter ``" "``, how a context/continuation pair is tokenised,
and how ``acc`` / ``acc_norm`` pick the answer. Each loader below reads one task's local files
under ``$LLM_PRUNER_DATA`` (see shared/data/MANIFEST.md for their formats and quirks) and turns
every document into the exact (context, continuation) requests lm-eval 0.4 would build.

Scoring: each request's log-likelihood is the sum of the log-probabilities of the continuation
tokens given the context. ``acc`` takes the argmax of the sums; ``acc_norm`` divides each sum by
the character length of its choice string first (lm-eval's ``completion_len``). WinoGrande puts
the choice in the context and scores only the shared rest of the sentence (partial scoring).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from evaluators.data import DATA_ENV, data_root, local_file
from space.errors import UserError

log = logging.getLogger(__name__)

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


# --- log-likelihoods -----------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-eval's HF model splits them.

    Trailing spaces of the context move to the continuation (" Paris" is one token, "Paris"
    after a space is not); then context+continuation is encoded *together* and cut after the
    context's own token count, so the continuation's tokens are the ones the model would see.
    The context keeps its separate encoding, as in lm-eval, even where the joint one differs.
    """
    if not context:
        raise ValueError("empty context")  # none of our tasks has one
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def _max_length(model) -> int:
    # lm-eval reads the config's position limit, else 2048.
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@torch.inference_mode()
def loglikelihoods(
    model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16, progress: bool = True
) -> list[float]:
    """Sum of log P(continuation | context) for each request, computed in batches.

    Inputs are (context + continuation)[:-1], right-padded; without an attention mask a causal
    model's real positions never see the padding, which sits after them. Requests with the same
    input (e.g. one-token answers "yes"/"no" after the same passage) share one forward pass.
    Longest first, so a batch pads little and an out-of-memory error shows up at once.
    """
    device = next(model.parameters()).device
    limit = _max_length(model)
    plans, unique = [], {}  # unique: input tokens -> index
    for context, continuation in requests:
        context_ids, cont_ids = encode_pair(tokenizer, context, continuation)
        if not cont_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        inputs = tuple((context_ids + cont_ids)[-(limit + 1) :][:-1])  # left-truncate like lm-eval
        plans.append((unique.setdefault(inputs, len(unique)), cont_ids))
    seqs = list(unique)
    users: list[list[int]] = [[] for _ in seqs]  # the requests that read each input's logits
    for request, (index, _) in enumerate(plans):
        users[index].append(request)
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), seqs[i]))
    out = [0.0] * len(plans)
    bar = tqdm(total=len(order), desc="zero-shot log-likelihoods", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids = torch.zeros(len(batch), len(seqs[batch[0]]), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : len(seqs[index])] = torch.tensor(seqs[index])
        logits = model(input_ids=ids.to(device)).logits
        for row, index in enumerate(batch):
            for request in users[index]:
                cont_ids = plans[request][1]
                end = len(seqs[index])
                # float32 log-softmax, only at the positions that predict the continuation
                logprobs = logits[row, end - len(cont_ids) : end].float().log_softmax(-1)
                target = torch.tensor(cont_ids, device=logprobs.device).unsqueeze(1)
                out[request] = logprobs.gather(1, target).sum().item()
        bar.update(len(batch))
    bar.close()
    return out


# --- metrics -------------------------------------------------------------------------------


def predictions(example: Example, lls: list[float]) -> dict[str, int]:
    """argmax of the log-likelihoods (acc) and of log-likelihood per character (acc_norm)."""
    normed = [ll / len(choice) for ll, choice in zip(lls, example.choices)]
    return {
        "acc": max(range(len(lls)), key=lls.__getitem__),
        "acc_norm": max(range(len(normed)), key=normed.__getitem__),
    }


def score_task(name: str, examples: list[Example], lls: list[list[float]]) -> dict:
    """lm-eval's metrics for one task, with the standard error of the headline metric."""
    hits = {metric: 0 for metric in METRICS[name]}
    for example, example_lls in zip(examples, lls, strict=True):
        predicted = predictions(example, example_lls)
        for metric in hits:
            hits[metric] += predicted[metric] == example.gold
    n = len(examples)
    result = {metric: count / n for metric, count in hits.items()}
    headline = result[HEADLINE[name]]
    result.update(
        n=n,
        metric=HEADLINE[name],
        stderr=math.sqrt(headline * (1 - headline) / (n - 1)) if n > 1 else float("nan"),
    )
    return result


def task_loglikelihoods(
    model, tokenizer, examples: list[Example], *, batch_size: int = 16, progress: bool = True
) -> list[list[float]]:
    """Per example, the log-likelihood of each of its choices."""
    flat = [request for example in examples for request in example.requests()]
    values = loglikelihoods(model, tokenizer, flat, batch_size=batch_size, progress=progress)
    out, at = [], 0
    for example in examples:
        out.append(values[at : at + len(example.choices)])
        at += len(example.choices)
    return out


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Score ``model`` on ``tasks``; the average uses each task's headline metric (``HEADLINE``).

    The model is used as given (dtype, device); pass a bfloat16 model for bfloat16 scoring.
    """
    names = parse_tasks(tasks)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name in names:
            examples = load_task(name, limit=limit)
            log.info("zero-shot %s: %d examples", name, len(examples))
            lls = task_loglikelihoods(model, tokenizer, examples, batch_size=batch_size, progress=progress)
            results[name] = score_task(name, examples, lls)
            log.info("zero-shot %s: %s %.4f", name, HEADLINE[name], results[name][HEADLINE[name]])
    finally:
        model.train(was_training)
    average = sum(r[r["metric"]] for r in results.values()) / len(results)
    return {
        "zeroshot": results,
        "zeroshot_avg": average,
        "zeroshot_avg_metrics": {name: HEADLINE[name] for name in names},
        "zeroshot_config": {"limit": limit, "batch_size": batch_size, "num_fewshot": 0,
                            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
    }
