"""One evaluation of a model in memory: perplexity on text datasets and, optionally, the zero-shot
tasks, returned as one record with everything needed to reproduce it.

Loading a model from a path is the caller's part (the ``eval`` command, :func:`search.evaluate`);
this takes the model and tokenizer as they are, in the dtype and on the device they are in.
"""

from __future__ import annotations

import time
from typing import Callable

from evaluators.data import dataset_windows
from evaluators.environment import environment
from evaluators.perplexity import count_params, perplexity
from evaluators.harness import evaluate_zeroshot


def evaluate(
    model,
    tokenizer,
    *,
    ppl: list[str] = ("wikitext2",),
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    zeroshot: list[str] | None = None,
    zeroshot_limit: int | None = None,
    zeroshot_batch_size: int = 16,
    progress: Callable | None = None,
) -> dict:
    """Perplexity of ``model`` on each dataset of ``ppl`` (non-overlapping windows of ``seqlen``,
    the first ``limit`` of them) and its zero-shot scores on ``zeroshot``."""
    started = time.time()
    parameter = next(model.parameters())
    windows = {name: dataset_windows(tokenizer, name, seqlen=seqlen, limit=limit) for name in ppl}
    values, counts, seconds = {}, {}, {}
    for name, w in windows.items():
        t = time.time()
        bar = (lambda it, _name=name, **kw: progress(it, desc=_name, **kw)) if progress else (lambda it, **_: it)
        values[name] = perplexity(model, w, batch_size=batch_size, progress=bar)
        counts[name] = int(w.shape[0])
        seconds[name] = round(time.time() - t, 3)
    scores = {}
    if zeroshot:
        t = time.time()
        scores = evaluate_zeroshot(model, tokenizer, zeroshot, limit=zeroshot_limit, batch_size=zeroshot_batch_size)
        seconds["zeroshot"] = round(time.time() - t, 3)
    return {
        "ppl": values,
        "seqlen": seqlen,
        "windows": counts,
        "limit_windows": limit,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": str(parameter.device),
        "params": count_params(model),
        **scores,
        "seconds": {"per_dataset": seconds, "total": round(time.time() - started, 3)},
        "environment": environment(),
    }


def eval_table(result: dict) -> str:
    """The record as Markdown tables (perplexity, zero-shot, parameters)."""
    lines = []
    if result["ppl"]:
        lines += ["", f"| dataset | windows x {result['seqlen']} | perplexity |", "|---|---|---|"]
        lines += [f"| {name} | {result['windows'][name]} | {value:.3f} |" for name, value in result["ppl"].items()]
    if result.get("zeroshot"):
        lines += ["", "| task | examples | metric | score |", "|---|---|---|---|"]
        lines += [f"| {name} | {task['n']} | {task['metric']} | {100 * task[task['metric']]:.2f} |"
                  for name, task in result["zeroshot"].items()]
        lines.append(f"| average | | | {100 * result['zeroshot_avg']:.2f} |")
    params = result["params"]
    lines += ["", f"block params {params['block']:,}, total params {params['total']:,}, dtype {result['dtype']}"]
    return "\n".join(lines)
