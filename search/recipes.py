"""Recipes: the seed systems of the field as settings of this engine (METHODS.md section 6).

A recipe is an importance score, an allocation rule, a compensation and the paper's calibration
settings, plus, for two of them, a selection step that picks what the paper lets the data pick:
NIRVANA's calibration seed (lowest KL to the dense model) and AdaPruner's calibration subset and
importance metric (Optuna TPE), both in search/selection.py. Recipes are registered by name in
:data:`RECIPES`; ``llm-pruner prune --method NAME`` and experiments/compare.py run them.

Calibration text is WikiText-2 validation for every recipe (PROTOCOL.md: no train split here),
with each paper's window count and length; ``notes`` say where a paper used other text.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from evaluators.data import CalibrationSpec
from evaluators.environment import environment
from reform.methods import method_spec
from reform.rectify import ReformSpec, output_stats, rectify, stats_overrides
from search.allocation import allocate
from space.adapters import ModelAdapter, adapter_for
from space.errors import UserError
from space.export import export_subnet
from space.importance import LayerScores, compute_scores, score_spec
from space.models import LoadedModel
from space.slicing import LayerOrder
from space.subnet import Subnet

log = logging.getLogger(__name__)

NONE = ReformSpec("none", "local")


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    importance: str | None  # None: chosen by the selection step (AdaPruner)
    allocation: str
    reform: ReformSpec
    calibration: CalibrationSpec
    allocation_options: dict = field(default_factory=dict)
    selection: str | None = None  # a name in search.selection.SELECTIONS
    selection_options: dict = field(default_factory=dict)
    notes: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name, "paper": self.paper, "importance": self.importance, "allocation": self.allocation,
            "allocation_options": self.allocation_options, "reform": self.reform.to_dict(),
            "calibration": self.calibration.to_dict(), "selection": self.selection,
            "selection_options": self.selection_options, "notes": self.notes,
        }

    def with_calibration(self, **changes) -> "Recipe":
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **changes))


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def recipe_spec(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown method {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


for _recipe in (
    Recipe("llm-pruner", "LLM-Pruner (Ma et al., NeurIPS 2023)", "taylor", "uniform-inner", NONE,
           CalibrationSpec("wikitext2", 10, 128, 0), {"first": 4, "last": 2},
           notes="paper: 10 Bookcorpus samples of 128 tokens; element² with --importance taylor-element2"),
    Recipe("flap", "FLAP (An et al., AAAI 2024)", "fluctuation", "global", ReformSpec("bias", "local"),
           CalibrationSpec("wikitext2", 1024, 128, 0), notes="WIFV metric, AL-AM structure, bias compensation"),
    Recipe("wanda-sp", "Wanda-sp (FLAP repository)", "wanda-sp", "uniform", NONE,
           CalibrationSpec("wikitext2", 1024, 128, 0)),
    Recipe("magnitude-sp", "magnitude-sp (FLAP repository)", "magnitude", "uniform", NONE,
           CalibrationSpec("wikitext2", 1, 128, 0), notes="weights only: the calibration is not used"),
    Recipe("nirvana", "NIRVANA (Ai et al., 2025)", "ntk", "two-thresholds", NONE,
           CalibrationSpec("wikitext2", 32, 128, 0), {"gamma": 3.0}, selection="kl-seed",
           selection_options={"seeds": 3, "heldout": 4, "heldout_seqlen": 256},
           notes="whole KV groups; calibration seed with the lowest KL(dense || pruned) on held-out "
                 "validation windows; window count and length are ours (not stated in what we could read)"),
    Recipe("numerical", "Numerical Pruning (Shen et al., AAAI 2025)", "newton", "global",
           ReformSpec("lstsq", "local"), CalibrationSpec("wikitext2", 128, 512, 0),
           notes="global threshold, a query head costing its q/o rows/columns and its share of k/v "
                 "(4·D_h/3 channels for MHA); paper windows are 2048 tokens, 512 here for CPU time"),
    Recipe("bip", "LLM-BIP (block-output influence; our reading, no public code)", "bip", "global", NONE,
           CalibrationSpec("wikitext2", 64, 512, 0),
           notes="one forward pass; global threshold over relative block-output deviations (space/influence.py)"),
    Recipe("adapruner", "AdaPruner (Kong et al., AAAI 2025)", None, "uniform-inner", NONE,
           CalibrationSpec("wikitext2", 10, 128, 0), {"first": 4, "last": 2}, selection="tpe",
           selection_options={"subsets": 4, "metrics": ["taylor-vector", "taylor", "taylor-element2"],
                              "trials": 8, "heldout": 4, "heldout_seqlen": 256},
           notes="TPE over (calibration subset, LLM-Pruner metric); objective = perplexity on held-out "
                 "validation windows; pruning as LLM-Pruner; LoRA recovery is `llm-pruner recover`"),
    Recipe("shortgpt", "ShortGPT (Men et al., 2024)", "block-influence", "drop-blocks", NONE,
           CalibrationSpec("wikitext2", 64, 512, 0), notes="depth only: whole blocks removed"),
):
    register_recipe(_recipe)


# --- running a recipe -------------------------------------------------------------------------


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
class Pruned:
    """A recipe applied to a model: the model is permuted; ``subnet`` with ``overrides`` is the
    pruned model (``subnet_view`` evaluates it, ``export_subnet`` writes it)."""

    adapter: ModelAdapter
    subnet: Subnet
    orders: list[LayerOrder]
    overrides: dict[str, torch.Tensor]
    record: dict


ScoreCache = dict  # (importance, calibration, ratio or None) -> (scores, seconds); also compensate()'s statistics


def score_windows(adapter: ModelAdapter, windows: torch.Tensor | None, importance: str, *, key, ratio: float,
                  batch_size: int, cache: ScoreCache | None, progress: Callable,
                  ) -> tuple[list[LayerScores], float, bool]:
    """Scores of the dense model, reused from ``cache`` when computed on the same windows before
    (and at the same ratio, for scores that depend on it); returns them, the seconds they took to
    compute, and whether they came from the cache."""
    spec = score_spec(importance)
    full_key = (importance, key, ratio if spec.uses_ratio else None)
    if cache is not None and full_key in cache:
        return (*cache[full_key], True)
    started = time.time()
    scores = compute_scores(adapter, windows, [importance], batch_size=batch_size, ratio=ratio,
                            progress=progress)[importance]
    if cache is not None:
        cache[full_key] = (scores, time.time() - started)
    return scores, time.time() - started, False


def plain_candidate(loaded: LoadedModel, recipe: Recipe, importance: str, *, ratio: float, batch_size: int,
                    cache: ScoreCache | None, progress: Callable) -> Candidate:
    adapter = adapter_for(loaded.model)
    needs = score_spec(importance).needs_data
    windows = recipe.calibration.windows(loaded.tokenizer) if needs else None
    calibration = recipe.calibration.to_dict() if needs else None
    scores, seconds, cached = score_windows(adapter, windows, importance, key=str(calibration), ratio=ratio,
                                            batch_size=batch_size, cache=cache, progress=progress)
    return Candidate(importance, scores, calibration, seconds, reused=seconds if cached else 0.0)


def shape(adapter: ModelAdapter, recipe: Recipe, importance: str, scores: list[LayerScores], *,
          ratio: float) -> tuple[list[LayerOrder], Subnet]:
    """Permute the (dense) model into the order of ``scores`` and allocate the recipe's widths."""
    from search.oneshot import order_model

    orders, ordered = order_model(adapter, scores)
    subnet = allocate(recipe.allocation, adapter.dims, ordered, ratio=ratio,
                      standardized=score_spec(importance).standardized, **recipe.allocation_options)
    return orders, subnet


def _order_key(orders: list[LayerOrder]) -> str:
    digest = hashlib.sha1()
    for order in orders:
        for t in (order.groups, order.heads, order.channels):
            digest.update(t.cpu().numpy().tobytes())
    return digest.hexdigest()


def compensate(adapter: ModelAdapter, subnet: Subnet, orders: list[LayerOrder], recipe: Recipe, tokenizer, *,
               batch_size: int, cache: ScoreCache | None, progress: Callable) -> tuple[dict[str, torch.Tensor], float]:
    """The recipe's compensation of ``subnet`` (overrides), and the seconds of statistics reused
    from ``cache``. A local compensation from means only (FLAP's bias) keeps the dense statistics
    in ``cache``: they depend on the calibration and the model's order, not on the ratio, so the
    other ratios of a comparison need no calibration pass. Least squares always streams: its
    second moments for every layer would grow with depth (a 7B model: ~1 GB per layer)."""
    spec, method = recipe.reform, method_spec(recipe.reform.method)
    if method.solve is None:
        return {}, 0.0
    if cache is None or spec.mode != "local" or method.gram:
        windows = recipe.calibration.windows(tokenizer)
        return rectify(adapter, subnet, windows, spec=spec, batch_size=batch_size, progress=progress), 0.0
    key = ("reform-means", str(recipe.calibration.to_dict()), _order_key(orders))
    reused = key in cache
    if not reused:
        started = time.time()
        windows = recipe.calibration.windows(tokenizer)
        stats = {layer.index: s for layer, s in output_stats(adapter, windows, gram=False, batch_size=batch_size,
                                                             progress=progress)}
        cache[key] = (stats, time.time() - started)
    stats, seconds = cache[key]
    # the cached statistics, bound to this model's layers (a comparison prunes a fresh copy per cell)
    overrides = stats_overrides(adapter, subnet, ((adapter.layers[i], s) for i, s in stats.items()), spec=spec)
    return overrides, seconds if reused else 0.0


def dense_copy(loaded: LoadedModel) -> LoadedModel:
    """A copy of the model to try a candidate on (the original stays dense)."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


def run_recipe(
    loaded: LoadedModel,
    recipe: Recipe,
    *,
    ratio: float,
    importance: str | None = None,
    batch_size: int = 8,
    cache: ScoreCache | None = None,
    progress: Callable = lambda it, **_: it,
) -> Pruned:
    """Apply ``recipe`` to the dense ``loaded`` model (permuted in place) at ``ratio``;
    ``importance`` replaces the recipe's score (e.g. LLM-Pruner's element²)."""
    from search.selection import SELECTIONS

    started = time.time()
    importance = importance or recipe.importance
    if importance is not None:
        score_spec(importance)
    if recipe.selection is not None:
        candidate = SELECTIONS[recipe.selection](loaded, recipe, ratio=ratio, importance=importance,
                                                 batch_size=batch_size, cache=cache, progress=progress)
    else:
        candidate = plain_candidate(loaded, recipe, importance, ratio=ratio, batch_size=batch_size, cache=cache,
                                    progress=progress)
    adapter = adapter_for(loaded.model)
    orders, subnet = shape(adapter, recipe, candidate.importance, candidate.scores, ratio=ratio)
    allocated = time.time()
    overrides, reused_stats = compensate(adapter, subnet, orders, recipe, loaded.tokenizer, batch_size=batch_size,
                                         cache=cache, progress=progress)
    finished = time.time()
    record = {
        "source": loaded.source.to_dict(),
        "target_ratio": ratio,
        "block_ratio": subnet.ratio(),
        "total_ratio": subnet.total_ratio(),
        "recipe": {
            **recipe.to_dict(),
            "method": recipe.name,
            "importance": candidate.importance,
            "calibration": candidate.calibration,
            "compensation": recipe.reform.method,
            "reform_calibration": recipe.calibration.to_dict() if recipe.reform.method != "none" else None,
            "selected": candidate.selection,
        },
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
    log.info("%s at %.2f: block ratio %.4f in %.1f s", recipe.name, ratio, subnet.ratio(), record["seconds"]["total"])
    return Pruned(adapter, subnet, orders, overrides, record)


def prune_with_recipe(loaded: LoadedModel, name: str, *, ratio: float, out_dir: Path, importance: str | None = None,
                      batch_size: int = 8, save_dtype=None, progress: Callable = lambda it, **_: it) -> Pruned:
    """Run recipe ``name`` and export the result to ``out_dir`` (``subnet.json`` records it)."""
    pruned = run_recipe(loaded, recipe_spec(name), ratio=ratio, importance=importance, batch_size=batch_size,
                        progress=progress)
    export_subnet(pruned.adapter, pruned.subnet, pruned.orders, out_dir, tokenizer=loaded.tokenizer,
                  metadata=pruned.record, overrides=pruned.overrides, dtype=save_dtype)
    return pruned
