"""The selection steps of two recipes: what the paper lets the data choose before pruning.

* ``kl-seed`` (NIRVANA): score with several calibration seeds, prune a copy of the model with
  each, keep the seed whose pruned model is closest to the dense one, KL(dense ‖ pruned) of the
  next-token distributions on held-out windows.
* ``tpe`` (AdaPruner): an Optuna TPE study over two categorical subspaces, the calibration subset
  and the importance metric; a trial prunes a copy with its pair and scores the perplexity on
  held-out windows; the best pair prunes the model.

Candidate calibration windows come from the first half of the validation text, held-out windows
from the second half, so the two never overlap (and neither touches a test split).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import optuna
import torch
import torch.nn.functional as F

from evaluators.data import calibration_text, random_windows, share, tokenize
from evaluators.perplexity import perplexity
from search.oneshot.recipes import Recipe
from search.oneshot.steps import Candidate, OneShotCache, cache_source, dense_copy, score_windows, shape
from space.adapters import adapter_for
from space.models import LoadedModel
from space.scores import ScoreContext
from space.scores.gradients import TAYLOR_SCORES, taylor_scores
from space.views import subnet_view

log = logging.getLogger(__name__)


def split_windows(tokenizer, recipe: Recipe, *, seed: int, nsamples: int | None = None, seqlen: int | None = None,
                  part: str) -> tuple[torch.Tensor, dict]:
    """Seeded random windows from the ``first`` or ``second`` half of the recipe's calibration
    text (its validation split), and their record."""
    cal = recipe.calibration
    nsamples, seqlen = nsamples or cal.nsamples, seqlen or cal.seqlen
    chunks = []
    for source, n in zip(cal.parts(), share(nsamples, len(cal.parts()))):
        if not n:
            continue
        tokens = tokenize(tokenizer, calibration_text(source))
        half = tokens.numel() // 2
        tokens = tokens[:half] if part == "first" else tokens[half:]
        chunks.append(random_windows(tokens, nsamples=n, seqlen=seqlen, seed=seed))
    windows = torch.cat(chunks)
    dataset = cal.to_dict()
    return windows, {"dataset": dataset["dataset"], "split": dataset["split"], "part": f"{part} half", "nsamples": nsamples,
                     "seqlen": seqlen, "seed": seed}


@torch.no_grad()
def kl_to_dense(dense, pruned, windows: torch.Tensor) -> float:
    """Mean over tokens of KL(p_dense ‖ p_pruned) of the next-token distributions."""
    total, count = 0.0, 0
    for ids in windows.split(1):
        p = F.log_softmax(dense(ids, use_cache=False).logits.float(), dim=-1)
        q = F.log_softmax(pruned(ids, use_cache=False).logits.float(), dim=-1)
        total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
        count += ids.numel()
    return total / count


def _heldout(loaded: LoadedModel, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    o = recipe.selection_options
    return split_windows(loaded.tokenizer, recipe, seed=recipe.calibration.seed, nsamples=o["heldout"],
                         seqlen=o["heldout_seqlen"], part="second")


def _try(loaded: LoadedModel, recipe: Recipe, importance: str, scores, ratio: float):
    """A pruned copy of the dense model: (copy, its adapter, subnet)."""
    trial = dense_copy(loaded)
    adapter = adapter_for(trial.model)
    _, subnet = shape(adapter, recipe, importance, scores, ratio=ratio)
    return trial, adapter, subnet


def kl_seed(loaded: LoadedModel, recipe: Recipe, *, ratio: float, importance: str, batch_size: int,
            cache: OneShotCache, progress: Callable) -> Candidate:
    heldout, heldout_record = _heldout(loaded, recipe)
    tried, best, seconds, reused = [], None, 0.0, 0.0
    for seed in range(recipe.calibration.seed, recipe.calibration.seed + recipe.selection_options["seeds"]):
        windows, record = split_windows(loaded.tokenizer, recipe, seed=seed, part="first")
        scores, took, cached = score_windows(loaded, lambda: windows, importance, calibration=record, ratio=ratio,
                                             batch_size=batch_size, cache=cache, progress=progress)
        seconds, reused = seconds + took, reused + (took if cached else 0.0)
        trial, trial_adapter, subnet = _try(loaded, recipe, importance, scores, ratio)
        with subnet_view(trial_adapter, subnet):
            kl = kl_to_dense(loaded.model, trial.model, heldout)
        del trial, trial_adapter
        tried.append({"seed": seed, "kl": kl})
        log.info("nirvana: calibration seed %d: KL %.4f", seed, kl)
        if best is None or kl < best[0]:
            best = (kl, scores, record)
    return Candidate(importance, best[1], best[2], seconds, reused,
                     selection={"by": "lowest KL(dense || pruned)", "tried": tried, "heldout": heldout_record})


def tpe(loaded: LoadedModel, recipe: Recipe, *, ratio: float, importance: str | None, batch_size: int,
        cache: OneShotCache, progress: Callable) -> Candidate:
    """AdaPruner's search; ``importance`` (if given) pins the metric subspace to that one score."""
    o = recipe.selection_options
    heldout, heldout_record = _heldout(loaded, recipe)
    metrics = [importance] if importance else list(o["metrics"])
    subsets = list(range(recipe.calibration.seed, recipe.calibration.seed + o["subsets"]))
    computed = {"seconds": 0.0}  # score computation inside this call
    used: dict[tuple[int, str], float] = {}  # each pair tried -> what its scores took to compute
    found: dict[tuple[int, str], tuple] = {}

    def objective(trial: optuna.Trial) -> float:
        subset = trial.suggest_categorical("calibration_subset", subsets)
        metric = trial.suggest_categorical("metric", metrics)
        windows, record = split_windows(loaded.tokenizer, recipe, seed=subset, part="first")
        if cache.comparison:
            computed["seconds"] += share_taylor_pass(loaded, windows, [m for m in metrics if m in TAYLOR_SCORES],
                                                     calibration=record, batch_size=batch_size, cache=cache,
                                                     progress=progress)
        scores, took, cached = score_windows(loaded, lambda: windows, metric, calibration=record, ratio=ratio,
                                             batch_size=batch_size, cache=cache, progress=progress)
        computed["seconds"] += 0.0 if cached else took
        used[(subset, metric)] = took
        trial_model, trial_adapter, subnet = _try(loaded, recipe, metric, scores, ratio)
        with subnet_view(trial_adapter, subnet):
            value = perplexity(trial_model.model, heldout)
        found[(subset, metric)] = (scores, record)
        log.info("adapruner trial %d: subset %d, %s: held-out perplexity %.3f", trial.number, subset, metric, value)
        return value

    sampler = optuna.samplers.TPESampler(seed=recipe.calibration.seed, n_startup_trials=min(4, o["trials"]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=o["trials"])
    best = study.best_params
    scores, record = found[(best["calibration_subset"], best["metric"])]
    trials = [{"number": t.number, **t.params, "heldout_ppl": t.value} for t in study.trials]
    seconds = sum(used.values())
    return Candidate(best["metric"], scores, record, seconds, max(0.0, seconds - computed["seconds"]),
                     selection={"by": "TPE, lowest held-out perplexity", "best": best, "trials": trials,
                                "heldout": heldout_record})


def share_taylor_pass(loaded: LoadedModel, windows, names: list[str], *, calibration: dict, batch_size: int,
                      cache: OneShotCache, progress: Callable) -> float:
    """Put every LLM-Pruner metric of ``names`` for these windows into ``cache`` from one set of
    gradients (each alone costs as much as all of them together), each charged its share of the
    time; return the seconds spent."""
    adapter = adapter_for(loaded.model)
    keys = {n: cache.scores.key(adapter, [n], source=cache_source(loaded), calibration=calibration, ratio=None)
            for n in names}
    missing = [n for n in names if cache.scores.get(keys[n]) is None]
    if len(missing) < 2:
        return 0.0
    started = time.time()
    ctx = ScoreContext(adapter.dims.head_dim, adapter.dims.group_size)
    modes = taylor_scores(adapter, windows, ctx, modes=tuple(TAYLOR_SCORES[n] for n in missing),
                          batch_size=batch_size, progress=progress)
    share = (time.time() - started) / len(missing)
    for name in missing:
        cache.scores.put(keys[name], {name: [s.to() for s in modes[TAYLOR_SCORES[name]]]}, share)
    return time.time() - started


SELECTIONS = {"kl-seed": kl_seed, "tpe": tpe}
