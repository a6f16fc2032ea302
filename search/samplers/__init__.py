"""Searchers by name: the paper's evolution, and Optuna's own samplers over the same space.

``evolution`` is :class:`search.samplers.evolution.EvolutionSampler`; ``tpe``, ``gp``, ``cmaes`` and
``random`` come from Optuna and see the same integer parameters (attention-shape index and MLP
grid index per layer); ``nsga2`` is Optuna's NSGA-II on two objectives (calibration perplexity,
kept block ratio) for a front of subnets over a ratio range. Every proposal is projected onto the
budget before it is evaluated, so no evaluation is spent on an out-of-budget candidate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import optuna

from search.samplers.evolution import PRESETS as EVOLUTION_PRESETS
from search.samplers.evolution import EvolutionSampler
from search.widths import WidthSpace
from space.errors import UserError
from space.subnet import Subnet

SEARCHERS = ("evolution", "tpe", "gp", "cmaes", "random", "nsga2")
MULTI_OBJECTIVE = {"nsga2"}


def make_sampler(
    name: str,
    *,
    space: WidthSpace,
    ratio: float,
    starts: Sequence[Subnet],
    channel_scores: Sequence[np.ndarray] | None,
    seed: int,
    evolution_preset: str = "cpu",
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` with its settings (starts are enqueued by the job for the others)."""
    if name == "evolution":
        if evolution_preset not in EVOLUTION_PRESETS:
            raise UserError(f"unknown evolution preset {evolution_preset!r}; known: {', '.join(EVOLUTION_PRESETS)}")
        p = EVOLUTION_PRESETS[evolution_preset]
        return EvolutionSampler(space=space, ratio=ratio, starts=starts, channel_scores=channel_scores,
                                population_size=p.population_size, num_mutants=p.num_mutants, top_k=p.top_k,
                                seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=len(starts))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    raise UserError(f"unknown searcher {name!r}; known: {', '.join(SEARCHERS)}")
