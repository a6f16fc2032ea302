"""Searchers by name: the paper's evolution, and Optuna's own samplers over the same space.

``evolution`` is :class:`search.samplers.evolution.EvolutionSampler` (presets ``paper``, ``cpu``,
``tiny``) or, with a staged preset (``staged``, ``staged-across``, ``staged-tiny``), EvoPress's selection in stages with
level-switch mutations (:class:`search.samplers.staged.StagedEvolution`); ``tpe``, ``gp``, ``cmaes`` and
``random`` come from Optuna and see the same integer parameters (attention-shape index and MLP
grid index per layer); ``nsga2`` is Optuna's NSGA-II on two objectives (calibration perplexity,
kept block ratio) for a front of subnets over a ratio range. Every proposal is projected onto the
budget before it is evaluated, so no evaluation is spent on an out-of-budget candidate.

A searcher is a factory registered in :data:`SAMPLERS` (:func:`register_sampler`): it gets the
width space, the budget, the one-shot starts, per-layer channel scores, a seed and the evolution
preset, and returns an Optuna sampler.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import optuna

from search.samplers.evolution import PRESETS as EVOLUTION_PRESETS
from search.samplers.evolution import EvolutionSampler
from search.samplers.levels import UnitErrors
from search.samplers.staged import PRESETS as STAGED_PRESETS
from search.samplers.staged import StagedEvolution
from search.widths import WidthSpace
from space.errors import UserError
from space.subnet import Subnet

SamplerFactory = Callable[..., optuna.samplers.BaseSampler]
SAMPLERS: dict[str, SamplerFactory] = {}
MULTI_OBJECTIVE = {"nsga2"}  # searchers of a front over a ratio range (two objectives)


def register_sampler(name: str, *, multi_objective: bool = False):
    def decorate(factory: SamplerFactory) -> SamplerFactory:
        SAMPLERS[name] = factory
        if multi_objective:
            MULTI_OBJECTIVE.add(name)
        return factory

    return decorate


@register_sampler("evolution")
def _evolution(*, space, ratio, starts, channel_scores, seed, evolution_preset, errors=None):
    if evolution_preset in STAGED_PRESETS:
        return StagedEvolution(space=space, ratio=ratio, starts=starts, preset=STAGED_PRESETS[evolution_preset],
                               errors=errors, seed=seed)
    if evolution_preset not in EVOLUTION_PRESETS:
        known = ", ".join([*EVOLUTION_PRESETS, *STAGED_PRESETS])
        raise UserError(f"unknown evolution preset {evolution_preset!r}; known: {known}")
    p = EVOLUTION_PRESETS[evolution_preset]
    return EvolutionSampler(space=space, ratio=ratio, starts=starts, channel_scores=channel_scores,
                            population_size=p.population_size, num_mutants=p.num_mutants, top_k=p.top_k, seed=seed)


@register_sampler("tpe")
def _tpe(*, seed, **_):
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)


@register_sampler("gp")
def _gp(*, seed, **_):
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)


@register_sampler("cmaes")
def _cmaes(*, seed, starts, **_):
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=len(starts))


@register_sampler("random")
def _random(*, seed, **_):
    return optuna.samplers.RandomSampler(seed=seed)


@register_sampler("nsga2", multi_objective=True)
def _nsga2(*, seed, **_):
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)



def make_sampler(
    name: str,
    *,
    space: WidthSpace,
    ratio: float,
    starts: Sequence[Subnet],
    channel_scores: Sequence[np.ndarray] | None,
    seed: int,
    evolution_preset: str = "cpu",
    errors: UnitErrors | None = None,
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` with its settings (starts are enqueued by the job for the others);
    ``errors``: the fitness's least-squares residuals, which weight staged evolution's switches."""
    if name not in SAMPLERS:
        raise UserError(f"unknown searcher {name!r}; known: {', '.join(SAMPLERS)}")
    extra = {"errors": errors} if name == "evolution" else {}
    return SAMPLERS[name](space=space, ratio=ratio, starts=starts, channel_scores=channel_scores, seed=seed,
                          evolution_preset=evolution_preset, **extra)
