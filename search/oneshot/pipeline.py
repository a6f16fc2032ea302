"""One-shot pruning, one pipeline for every recipe: score the dense model (or let the recipe's
selection step choose its scores), permute it into importance order, allocate widths on the budget,
compensate, and export.

``prune --method NAME`` runs a registered recipe; ``prune --importance X --allocation Y --reform Z``
runs the anonymous recipe of those settings (:func:`search.oneshot.recipes.custom_recipe`); both go
through :func:`run_recipe`. An existing export can be rectified again from its source model
(:func:`reform_export`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from evaluators.data import CalibrationSpec, as_calibration
from evaluators.environment import environment
from reform.rectify import rectify
from reform.spec import ReformSpec
from search.oneshot.recipes import Recipe, custom_recipe, recipe_spec
from search.oneshot.selection import SELECTIONS
from search.oneshot.steps import OneShotCache, cache_source, compensate, plain_candidate, shape
from space.adapters import ModelAdapter, adapter_for
from space.errors import UserError
from space.export import export_subnet, record_header
from space.models import LoadedModel, as_loaded
from space.order import LayerOrder, orders_from_kept, permute_model
from space.scores import LayerScores, score_spec
from space.scores.cache import IMPORTANCE_FILE, save_scores
from space.subnet import Subnet

log = logging.getLogger(__name__)


@dataclass
class Pruned:
    """A recipe applied to a model: the model is permuted; ``subnet`` with ``overrides`` is the
    pruned model (``space.subnet_view`` evaluates it, :meth:`export` writes it)."""

    adapter: ModelAdapter
    subnet: Subnet
    orders: list[LayerOrder]
    overrides: dict[str, torch.Tensor]
    record: dict
    scores: dict[str, list[LayerScores]]  # the scores the order came from, by name
    score_key: dict

    def export(self, out_dir: Path, *, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
        """Write the pruned model to ``out_dir`` (``subnet.json`` records the recipe) and, next to
        it, the scores used (``importance.pt``)."""
        export_subnet(self.adapter, self.subnet, self.orders, out_dir, tokenizer=tokenizer, metadata=self.record,
                      overrides=self.overrides, dtype=dtype)
        # written after the export, which replaced the folder
        save_scores(Path(out_dir) / IMPORTANCE_FILE, self.scores, self.score_key)
        return Path(out_dir)


def run_recipe(
    loaded: LoadedModel,
    recipe: Recipe,
    *,
    ratio: float,
    importance: str | None = None,
    batch_size: int = 8,
    cache: OneShotCache | None = None,
    progress: Callable = lambda it, **_: it,
) -> Pruned:
    """Apply ``recipe`` to the dense ``loaded`` model (permuted in place) at ``ratio``;
    ``importance`` replaces the recipe's score (e.g. LLM-Pruner's element²). ``cache``: what a
    comparison reuses across ratios (default: scores only, from the shared cache)."""
    started = time.time()
    cache = cache or OneShotCache(comparison=False)
    importance = importance or recipe.importance
    if importance is not None:
        score_spec(importance)
    select = SELECTIONS[recipe.selection] if recipe.selection is not None else plain_candidate
    candidate = select(loaded, recipe, importance=importance, ratio=ratio, batch_size=batch_size, cache=cache,
                       progress=progress)
    adapter = adapter_for(loaded.model)
    orders, subnet = shape(adapter, recipe, candidate.importance, candidate.scores, ratio=ratio)
    allocated = time.time()
    overrides, reused_stats = compensate(adapter, subnet, orders, recipe, loaded.tokenizer, batch_size=batch_size,
                                         cache=cache, progress=progress)
    finished = time.time()
    record = {
        **record_header(loaded.source, subnet, ratio),
        "recipe": _recipe_record(recipe, candidate),
        "seconds": {
            "importance": round(candidate.seconds, 3),
            "scoring_selection_allocation": round(allocated - started, 3),
            "reform": round(finished - allocated, 3),
            # as if nothing had been cached: what an earlier ratio computed counts again
            "total": round(finished - started + candidate.reused + reused_stats, 3),
            "reused_scores": round(candidate.reused, 3),
            "reused_reform_stats": round(reused_stats, 3),
        },
        "environment": environment(),
    }
    log.info("%s at %.2f: block ratio %.4f in %.1f s", recipe.name or "prune", ratio, subnet.ratio(),
             record["seconds"]["total"])
    key = cache.scores.key(adapter, [candidate.importance], source=cache_source(loaded),
                           calibration=candidate.calibration, ratio=ratio)
    return Pruned(adapter, subnet, orders, overrides, record, {candidate.importance: candidate.scores}, key)


def _recipe_record(recipe: Recipe, candidate) -> dict:
    reform = recipe.reform
    calibration = recipe.compensation_calibration.to_dict() if reform.method != "none" else None
    return {
        **recipe.to_dict(),
        "method": recipe.name,
        "importance": candidate.importance,
        "calibration": candidate.calibration,
        "compensation": reform.method,
        "reform": {**reform.to_dict(), "calibration": calibration},
        "selected": candidate.selection,
    }


def prune(
    model,
    *,
    ratio: float,
    method: str | None = None,
    importance: str | None = None,
    allocation: str = "uniform-mlp",
    reform: ReformSpec | None = None,
    calibration: CalibrationSpec | None = None,
    reform_calibration: CalibrationSpec | None = None,
    mlp_step: int = 1,
    tokenizer=None,
    out: Path | None = None,
    save_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    cache: OneShotCache | None = None,
    progress: Callable = lambda it, **_: it,
) -> Pruned:
    """Prune ``model`` (a path, hub id, alias, or a model object with its ``tokenizer``) to ``ratio``,
    the kept fraction of block weights, and export it to ``out`` when given.

    ``method``: a registered recipe (``importance`` then replaces its score). Without it, the
    anonymous recipe ``importance`` (default wanda-sp) x ``allocation`` x ``reform`` (default: no
    compensation) with scores on ``calibration`` and the compensation on ``reform_calibration``
    (each a :class:`CalibrationSpec`, or a dataset spec or ``datasets.Dataset`` to draw its
    default windows from).
    """
    if method is not None:
        recipe = recipe_spec(method)
    else:
        recipe = custom_recipe(importance=importance or "wanda-sp", allocation=allocation,
                               reform=reform or ReformSpec("none"),
                               calibration=as_calibration(calibration) or CalibrationSpec(),
                               reform_calibration=as_calibration(reform_calibration), mlp_step=mlp_step)
        importance = None
    loaded = as_loaded(model, tokenizer)
    pruned = run_recipe(loaded, recipe, ratio=ratio, importance=importance, batch_size=batch_size, cache=cache,
                        progress=progress)
    if out is not None:
        pruned.export(out, tokenizer=loaded.tokenizer, dtype=save_dtype)
    return pruned


def reform_export(
    loaded: LoadedModel,
    record: dict,
    *,
    reform: ReformSpec,
    calibration: CalibrationSpec,
    out_dir: Path,
    reformed_from: str,
    batch_size: int = 8,
    save_dtype=None,
    progress: Callable = lambda it: it,
) -> tuple[Subnet, dict]:
    """Rectify the subnet an export's ``record`` (its ``subnet.json``) describes, from its
    dense source model ``loaded``, and export the result to ``out_dir``."""
    started = time.time()
    adapter = adapter_for(loaded.model)
    subnet = Subnet.from_dict(record["subnet"])
    if subnet.dims != adapter.dims:
        raise UserError(f"the source model {loaded.source.path} does not have the shape the export records "
                        f"({adapter.dims} vs {subnet.dims})")
    orders = orders_from_kept(record["kept"], adapter.dims)
    permute_model(adapter, orders)
    reform_started, overrides = time.time(), {}
    if reform.method != "none":
        overrides = rectify(adapter, subnet, calibration.windows(loaded.tokenizer), spec=reform, orders=orders,
                            batch_size=batch_size, progress=progress)
    reform_entry = {**reform.to_dict(), "calibration": calibration.to_dict() if reform.method != "none" else None}
    new_record = {
        **record_header(loaded.source, subnet, record.get("target_ratio")),
        "recipe": {**record.get("recipe", {}), "compensation": reform.method, "reform": reform_entry},
        "reformed_from": reformed_from,
        "seconds": {"reform": round(time.time() - reform_started, 3)},
        "environment": environment(),
    }
    export_subnet(adapter, subnet, orders, out_dir, tokenizer=loaded.tokenizer, metadata=new_record,
                  overrides=overrides, dtype=save_dtype)
    new_record["seconds"]["total"] = round(time.time() - started, 3)
    return subnet, new_record
