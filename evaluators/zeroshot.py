"""Zero-shot multiple-choice scoring, the way lm-evaluation-harness scores it.

Each request's log-likelihood is the sum of the log-probabilities of the continuation tokens given
the context, with the context/continuation split tokenised as lm-eval's HF model does. ``acc``
takes the argmax of the sums; ``acc_norm`` divides each sum by the character length of its choice
string first (lm-eval's ``completion_len``). WinoGrande puts the choice in the context and scores
only the shared rest of the sentence (partial scoring). The tasks are :mod:`evaluators.tasks`.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from evaluators.tasks import HEADLINE, METRICS, Example, load_task, parse_tasks

log = logging.getLogger(__name__)


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
