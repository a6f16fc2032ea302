"""Evolution with selection in stages (EvoPress): one incumbent, many children scored on few
tokens, the best few re-scored on more fresh tokens, the last survivor against the incumbent re-scored
on the same tokens (elitist).

A generation's children are level switches of the incumbent (:mod:`search.samplers.levels`): the same
size by construction. Their MLP quantum starts coarse and halves in each of ``rounds``
coarse-to-fine rounds (Týr-the-Pruner). Every stage draws fresh windows from the fitness region,
seeded by the generation, so a resumed job scores exactly what an uninterrupted one would.

The driver runs the stages (:mod:`search.stages`); this sampler only decides what each trial
is: the loop hands it the child a trial is for (:meth:`propose`), Optuna records the parameters.
Generation 0 scores the one-shot starts the same way and keeps the best as the first incumbent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler

from search.samplers.levels import LevelSwitches, UnitErrors
from search.widths import WidthSpace
from space.subnet import LayerWidths, Subnet


@dataclass(frozen=True)
class StagedPreset:
    offspring: int  # children per generation
    survivors: tuple[int, ...]  # candidates entering each stage after the first (the last: 1)
    windows: tuple[int, ...]  # fitness windows per stage, growing
    rounds: int  # coarse-to-fine rounds
    coarse_steps: int  # MLP grid steps a switch moves in the first round, halved every round
    across: float = 0.0  # share of switches that trade attention for MLP width (LevelSwitches.across_prob)
    # the last stage also scores the two best children of the stage before it combined (both one's and the
    # other's switches): a generation may then take two children's moves
    combine: bool = False
    # what a search with this preset gets when the command line does not say (SearchConfig.create):
    children: int = 260  # --trials
    fitness_windows: int | None = None  # --fitness-nsamples, the region the generations draw from; 4 x pool
    rescoring_windows: int | None = None  # --final-nsamples, the finalists'; max(32, 4 x the last stage)

    @property
    def pool(self) -> int:
        """Fitness windows a generation draws from (its stages never share one)."""
        return sum(self.windows)

    def default_fitness_windows(self) -> int:
        return self.fitness_windows or 4 * self.pool

    def default_rescoring_windows(self) -> int:
        return self.rescoring_windows or max(32, 4 * self.windows[-1])


PRESETS = {
    # 16 children on 1 window of 512 tokens, the best 4 on 4 fresh windows, the best of those and the
    # incumbent on 16 more: 64 window evaluations a generation, like 8 children on 8 windows.
    "staged": StagedPreset(offspring=16, survivors=(4, 1), windows=(1, 4, 16), rounds=3, coarse_steps=4),
    # the same with one switch in six across kinds: the split between attention and MLP moves too
    "staged-across": StagedPreset(offspring=16, survivors=(4, 1), windows=(1, 4, 16), rounds=3, coarse_steps=4,
                                  across=1 / 6),
    # the last stage on 8 windows (48 evaluations a generation), since half the late decisions on 16 are coin
    # flips anyway (experiments/results/stage_decisions.md): with 340 children it makes as many window
    # evaluations as `staged` with 260 (22 generations instead of 17), from as many fitness windows, its
    # finalists re-scored on as many (quality.md's last8 row)
    "staged-8": StagedPreset(offspring=16, survivors=(4, 1), windows=(1, 4, 8), rounds=3, coarse_steps=4,
                             children=340, fitness_windows=84, rescoring_windows=64),
    # `staged-8` whose last stage also scores the two best children of the second stage combined (56 window
    # evaluations a generation where they combine): 292 children make about as many window evaluations as
    # `staged-8` with 340 (quality.md's combine row: better at 0.6, worse at 0.5, so not the default)
    "staged-8-combine": StagedPreset(offspring=16, survivors=(4, 1), windows=(1, 4, 8), rounds=3, coarse_steps=4,
                                     combine=True, children=292, fitness_windows=84, rescoring_windows=64),
    "staged-tiny": StagedPreset(offspring=4, survivors=(2, 1), windows=(1, 2, 3), rounds=2, coarse_steps=2),
}


class StagedEvolution(BaseSampler):
    """The (1 + λ) evolution of EvoPress over per-layer widths, with level-switch mutations."""

    def __init__(self, *, space: WidthSpace, ratio: float, starts: Sequence[Subnet], preset: StagedPreset,
                 errors: UnitErrors | None = None, seed: int = 0):
        if not starts:
            raise ValueError("at least one start is needed")
        self.space = space
        self.preset = preset
        # starts inside the space are kept as they are (starts_for puts them on the budget; a depth start,
        # as near it as whole sub-layers go, could not be projected); level switches keep their size
        self.starts = [s if space.contains(s) else space.repair(s, ratio) for s in starts]
        self.switches = LevelSwitches(space, errors=errors, across_prob=preset.across)
        self.seed = seed
        self._proposed: dict[str, int] | None = None

    # --- what the loop asks -----------------------------------------------------------------

    def generations(self, trials: int) -> int:
        """Generations that evaluate about ``trials`` children (generation 0: the starts)."""
        return 1 + math.ceil(max(0, trials - len(self.starts)) / self.preset.offspring)

    def quantum(self, generation: int, generations: int) -> int:
        """MLP channels a switch moves in ``generation``: coarse first, halved every round."""
        later = max(1, generations - 1)
        round_ = min(self.preset.rounds - 1, (generation - 1) * self.preset.rounds // later)
        return self.space.bounds.step * max(1, self.preset.coarse_steps >> max(0, round_))

    def children(self, incumbent: Subnet, generation: int, generations: int) -> list[Subnet]:
        """Generation 0: the starts; later: distinct level-switch children of ``incumbent``."""
        if generation == 0:
            return list(self.starts)
        rng = np.random.default_rng([self.seed, generation])
        quantum = self.quantum(generation, generations)
        out: list[Subnet] = []
        for _ in range(self.preset.offspring):
            child = incumbent
            for _attempt in range(20):  # a child equal to the incumbent or a sibling is wasted
                child = self.switches.mutate(incumbent, rng, quantum)
                if child != incumbent and child not in out:
                    break
            out.append(child)
        return out

    def combined(self, incumbent: Subnet | None, first: Subnet, second: Subnet) -> Subnet | None:
        """``incumbent`` with the changes of both children: each one's MLP channel changes added, and the
        attention shape of a layer only one of them changes. Each child keeps the incumbent's attention and
        MLP totals, so their changes together keep them too. None where both change one layer's attention
        shape, a layer's channels leave the grid, the two are one, or there is no incumbent."""
        if incumbent is None or not self.preset.combine or first == second:
            return None
        layers = []
        for base, a, b in zip(incumbent.layers, first.layers, second.layers):
            shapes = {(w.kv_heads, w.q_per_kv) for w in (a, b)} - {(base.kv_heads, base.q_per_kv)}
            if len(shapes) > 1:
                return None
            kv, q = shapes.pop() if shapes else (base.kv_heads, base.q_per_kv)
            channels = a.channels + b.channels - base.channels
            if channels not in self.switches.channels:
                return None
            layers.append(LayerWidths(kv, q, channels))
        return Subnet(incumbent.dims, layers)

    def stage_rows(self, generation: int, pool_size: int) -> list[list[int]]:
        """The fitness windows of each stage of ``generation``: fresh, disjoint while the pool lasts."""
        rng = np.random.default_rng([self.seed, generation, 1])
        order = list(rng.permutation(pool_size))
        rows, offset = [], 0
        for n in self.preset.windows:
            if offset + n > pool_size:  # a small pool: draw this stage anew
                order, offset = list(rng.permutation(pool_size)), 0
            rows.append([int(r) for r in order[offset: offset + min(n, pool_size)]])
            offset += n
        return rows

    def propose(self, params: dict[str, int]) -> None:
        """The parameters of the next trial the study asks for."""
        self._proposed = params

    # --- Optuna sampler interface -----------------------------------------------------------

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(self, study, trial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        if self._proposed is None:
            raise RuntimeError("staged evolution: every trial is proposed by the staged loop")
        params, self._proposed = self._proposed, None
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise RuntimeError(f"staged evolution: parameter {param_name} outside the width space")
