"""The steps of one-shot pruning that the pipeline and the recipes' selection steps share: score
the dense model through the one score cache, shape it (permute into importance order, allocate
widths), and compensate the pruned layers."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from reform.local import output_stats, stats_overrides
from reform.rectify import rectify
from reform.spec import method_spec
from search.oneshot.allocation import allocate
from search.oneshot.recipes import Recipe
from space.adapters import ModelAdapter, adapter_for
from space.models import LoadedModel
from space.order import LayerOrder, order_model, orders_key
from space.scores import LayerScores, score_spec
from space.scores.cache import ScoreCache
from space.subnet import Subnet


@dataclass
class Candidate:
    """Scores chosen for a model, and where they came from (recorded in subnet.json)."""

    importance: str
    scores: list[LayerScores]
    calibration: dict | None
    seconds: float  # computing every score this candidate's choice looked at
    reused: float = 0.0  # the part of ``seconds`` saved by the cache in this call
    selection: dict = field(default_factory=dict)


@dataclass
class OneShotCache:
    """What one-shot pruning computes once per model and reuses: importance scores (always), and in
    a ``comparison`` (one model pruned at many ratios) also the dense means of FLAP's bias
    compensation and one gradient pass shared by LLM-Pruner's metrics."""

    scores: ScoreCache = field(default_factory=ScoreCache)
    comparison: bool = True
    reform_means: dict = field(default_factory=dict)


def cache_source(loaded: LoadedModel) -> str | None:
    """The path scores of ``loaded`` are cached under on disk (None: a model built in memory)."""
    return loaded.source.path if loaded.source.kind != "memory" else None


def score_windows(loaded: LoadedModel, windows: Callable[[], torch.Tensor], importance: str, *,
                  calibration: dict | None, ratio: float, batch_size: int, cache: OneShotCache,
                  progress: Callable) -> tuple[list[LayerScores], float, bool]:
    """Scores of the dense model on ``windows()``, reused from ``cache`` when computed on the same
    windows before (and at the same ratio, for scores that depend on it); returns them, the
    seconds they took to compute, and whether they came from the cache."""
    scored = cache.scores.scores(adapter_for(loaded.model), [importance], windows=windows,
                                 source=cache_source(loaded), calibration=calibration, ratio=ratio,
                                 batch_size=batch_size, progress=progress)
    return scored.scores[importance], scored.seconds, scored.reused


def plain_candidate(loaded: LoadedModel, recipe: Recipe, importance: str, *, ratio: float, batch_size: int,
                    cache: OneShotCache, progress: Callable) -> Candidate:
    """The recipe's own score on its own calibration (no selection step)."""
    calibration = recipe.calibration.to_dict() if score_spec(importance).needs_data else None
    scores, seconds, cached = score_windows(loaded, lambda: recipe.calibration.windows(loaded.tokenizer), importance,
                                            calibration=calibration, ratio=ratio, batch_size=batch_size,
                                            cache=cache, progress=progress)
    return Candidate(importance, scores, calibration, seconds, reused=seconds if cached else 0.0)


def shape(adapter: ModelAdapter, recipe: Recipe, importance: str, scores: list[LayerScores], *,
          ratio: float) -> tuple[list[LayerOrder], Subnet]:
    """Permute the (dense) model into the order of ``scores`` and allocate the recipe's widths."""
    orders, ordered = order_model(adapter, scores)
    subnet = allocate(recipe.allocation, adapter.dims, ordered, ratio=ratio,
                      standardized=score_spec(importance).standardized, **recipe.allocation_options)
    return orders, subnet


def compensate(adapter: ModelAdapter, subnet: Subnet, orders: list[LayerOrder], recipe: Recipe, tokenizer, *,
               batch_size: int, cache: OneShotCache, progress: Callable) -> tuple[dict[str, torch.Tensor], float]:
    """The recipe's compensation of ``subnet`` (overrides), and the seconds of statistics reused
    from ``cache``. A local compensation from means only (FLAP's bias) keeps the dense statistics
    in ``cache``: they depend on the calibration and the model's order, not on the ratio, so the
    other ratios of a comparison need no calibration pass. Least squares always streams: its
    second moments for every layer would grow with depth (a 7B model: ~1 GB per layer)."""
    spec, method = recipe.reform, method_spec(recipe.reform.method)
    if method.solve is None:
        return {}, 0.0
    calibration = recipe.compensation_calibration
    if not cache.comparison or spec.mode != "local" or method.gram:
        windows = calibration.windows(tokenizer)
        return rectify(adapter, subnet, windows, spec=spec, batch_size=batch_size, progress=progress), 0.0
    key = (str(calibration.to_dict()), orders_key(orders))
    reused = key in cache.reform_means
    if not reused:
        started = time.time()
        windows = calibration.windows(tokenizer)
        stats = {layer.index: s for layer, s in output_stats(adapter, windows, gram=False, batch_size=batch_size,
                                                             progress=progress)}
        cache.reform_means[key] = (stats, time.time() - started)
    stats, seconds = cache.reform_means[key]
    # the cached statistics, bound to this model's layers (a comparison prunes a fresh copy per cell)
    overrides = stats_overrides(adapter, subnet, ((adapter.layers[i], s) for i, s in stats.items()), spec=spec)
    return overrides, seconds if reused else 0.0


def dense_copy(loaded: LoadedModel) -> LoadedModel:
    """A copy of the model to try a candidate on (the original stays dense)."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
