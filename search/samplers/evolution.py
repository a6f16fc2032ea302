"""The evolutionary searcher of "Search for Efficient LLMs" as an Optuna sampler.

Generations live in the study (``BaseGASampler``), so a resumed job continues the same
evolution with no state of its own. Each generation has ``population_size`` children:
``num_mutants`` mutants and the rest layer-wise crossovers of the ``top_k`` parents, which are
chosen from the previous generation and its parents together (elitist). Generation 0 starts from
importance-based allocations (``starts``: e.g. uniform and global-threshold) and mutants of them.

Every child is on the budget by construction: a mutation moves units between layers (MLP channels
from one layer to another, or one attention-shape step in a layer paid for with MLP channels
elsewhere), choosing donors and recipients by importance: a layer whose last kept units score low
gives, a layer whose first removed units score high receives. The paper's mask mutation
(resampling index sets until 80 % overlap) is not needed: kept units are importance prefixes.
Rounding is settled by the width space's projection.

Pure Python and numpy: no torch, tests run on an in-memory storage in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseGASampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.widths import WidthSpace
from space.errors import UserError
from space.subnet import LayerWidths, Subnet


@dataclass(frozen=True)
class EvolutionPreset:
    population_size: int  # children per generation
    num_mutants: int
    top_k: int
    generations: int


PRESETS = {
    # The paper: 50 mutants + 30 crossovers per generation from the top 10, 50 generations (its
    # initial population of 100 becomes a first generation of 80 here: one size per generation).
    "paper": EvolutionPreset(population_size=80, num_mutants=50, top_k=10, generations=50),
    "cpu": EvolutionPreset(population_size=16, num_mutants=10, top_k=4, generations=10),
    "tiny": EvolutionPreset(population_size=6, num_mutants=4, top_k=2, generations=3),
}


class EvolutionSampler(BaseGASampler):
    """Importance-initialised, budget-preserving evolution over per-layer widths.

    Args:
        space: the per-layer width space (distributions, grid, projection).
        ratio: the budget (kept fraction of block weights).
        starts: subnets generation 0 begins with (evaluated as they are, then mutated).
        channel_scores: per layer, the MLP channel scores in importance order (descending), on
            a comparable scale across layers; None chooses donors and recipients uniformly.
        first_mutation_prob / mutation_prob: per-layer chance of a move in generation 0 / later
            (the paper's 0.3 and 0.1 for ratio mutation).
        max_move_steps: the largest MLP move, in grid steps.
        temperature: softness of the importance-weighted choice of partners.
    """

    def __init__(
        self,
        *,
        space: WidthSpace,
        ratio: float,
        starts: Sequence[Subnet],
        channel_scores: Sequence[np.ndarray] | None = None,
        population_size: int = 16,
        num_mutants: int = 10,
        top_k: int = 4,
        first_mutation_prob: float = 0.3,
        mutation_prob: float = 0.1,
        attention_move_prob: float = 0.25,
        max_move_steps: int = 4,
        temperature: float = 1.0,
        seed: int | None = None,
    ):
        super().__init__(population_size=population_size)
        if not 0 <= num_mutants <= population_size:
            raise ValueError("num_mutants must be between 0 and population_size")
        if top_k < 1 or not starts:
            raise ValueError("top_k must be >= 1 and at least one start is needed")
        self.space = space
        self.ratio = ratio
        self.starts = [space.repair(s, ratio) for s in starts]
        self.channel_scores = None if channel_scores is None else [np.asarray(s, dtype=float) for s in channel_scores]
        self.num_mutants = num_mutants
        self.top_k = top_k
        self.first_mutation_prob = first_mutation_prob
        self.mutation_prob = mutation_prob
        self.attention_move_prob = attention_move_prob
        self.max_move_steps = max_move_steps
        self.temperature = temperature
        self.seed = 0 if seed is None else seed

    # --- Optuna sampler interface -----------------------------------------------------------

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        trials = study._get_trials(deepcopy=False, use_cache=True)
        # the child's place among the drawn ones: a queued trial (a failed or interrupted trial's
        # candidate again, in its place) shifts no later child's random stream
        slot = trial.number - sum(1 for t in trials if t.number < trial.number and "fixed_params" in t.system_attrs)
        rng = np.random.default_rng([self.seed, slot])
        generation = self.get_trial_generation(study, trial)
        seen = {self._key(t.params) for t in trials if t.params}
        child, failure = None, None
        for attempt in range(20):  # avoid re-evaluating a subnet the study already has
            try:
                drawn = self._child(study, slot, generation, rng, attempt)
            except ValueError as exc:  # a proposal the width grid cannot bring onto the budget: another
                failure = exc
                continue
            child = drawn
            if self._key(self.space.encode(child)) not in seen:
                break
        if child is None:
            raise UserError(f"no child of generation {generation} could be brought onto ratio {self.ratio} in 20 "
                            f"draws ({failure}); give a finer --mlp-step")
        return self.space.encode(child)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # Only reached for parameters outside the width space (none in our jobs).
        rng = np.random.default_rng([self.seed, trial.number, hash(param_name) % 2**32])
        return int(rng.integers(param_distribution.low, param_distribution.high + 1))

    def select_parent(self, study: Study, generation: int) -> list[FrozenTrial]:
        pool = self.get_population(study, generation - 1) + self.get_parent_population(study, generation - 1)
        sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
        unique: dict[tuple, FrozenTrial] = {}
        for t in sorted(pool, key=lambda t: sign * t.value):
            unique.setdefault(self._key(t.params), t)
        return list(unique.values())[: self.top_k]

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        pass

    # --- children ---------------------------------------------------------------------------

    @staticmethod
    def _key(params: dict) -> tuple:
        return tuple(sorted(params.items()))

    def _child(self, study: Study, slot: int, generation: int, rng, attempt: int) -> Subnet:
        if generation == 0:
            if slot < len(self.starts) and attempt == 0:
                return self.starts[slot]
            parent = self.starts[int(rng.integers(len(self.starts)))]
            return self.mutate(parent, rng, self.first_mutation_prob)
        parents = [self.space.decode(t.params) for t in self.get_parent_population(study, generation)]
        if not parents:
            return self.mutate(self.starts[int(rng.integers(len(self.starts)))], rng, self.first_mutation_prob)
        if len(parents) == 1 or rng.random() < self.num_mutants / self.population_size:
            return self.mutate(parents[int(rng.integers(len(parents)))], rng, self.mutation_prob)
        a, b = rng.choice(len(parents), size=2, replace=False)
        return self.crossover(parents[a], parents[b], rng)

    def crossover(self, a: Subnet, b: Subnet, rng) -> Subnet:
        """Each layer's widths from one parent or the other, then back onto the budget."""
        take = rng.random(len(a.layers)) < 0.5
        layers = [wa if t else wb for wa, wb, t in zip(a.layers, b.layers, take)]
        return self.space.repair(Subnet(a.dims, layers), self.ratio)

    def mutate(self, parent: Subnet, rng, prob: float) -> Subnet:
        """Budget-preserving moves in the layers drawn with probability ``prob`` (at least one)."""
        layers = list(parent.layers)
        chosen = np.flatnonzero(rng.random(len(layers)) < prob)
        if chosen.size == 0:
            chosen = np.array([int(rng.integers(len(layers)))])
        for i in rng.permutation(chosen):
            if len(self.space.shapes) > 1 and rng.random() < self.attention_move_prob:
                self._move_attention(layers, int(i), rng)
            else:
                self._move_channels(layers, int(i), rng)
        return self.space.repair(Subnet(parent.dims, layers), self.ratio)

    # --- moves ------------------------------------------------------------------------------

    def _boundary(self, layer: int, channels: int, giving: bool) -> float:
        """Score of the unit a layer would give (its last kept) or receive (its first removed)."""
        if self.channel_scores is None:
            return 0.0
        scores = self.channel_scores[layer]
        position = channels - 1 if giving else channels
        if position < 0:
            return np.inf if giving else scores[0]
        if position >= scores.size:
            return -np.inf if not giving else scores[-1]
        return float(scores[position])

    def _partner(self, layers: list[LayerWidths], exclude: int, giving: bool, rng) -> int | None:
        """A layer to give channels (``giving``) or receive them, weighted by importance."""
        grid = self.space.grid
        candidates = [j for j in range(len(layers)) if j != exclude and
                      (layers[j].channels > grid[0] if giving else layers[j].channels < grid[-1])]
        if not candidates:
            return None
        scores = np.array([self._boundary(j, layers[j].channels, giving) for j in candidates])
        logits = (-scores if giving else scores) / self.temperature
        logits = np.where(np.isfinite(logits), logits, -1e9)
        weights = np.exp(logits - logits.max())
        return candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]

    def _shift(self, channels: int, steps: int) -> int:
        grid = self.space.grid
        return grid[int(np.clip(grid.index(channels) + steps, 0, len(grid) - 1))]

    def _move_channels(self, layers: list[LayerWidths], i: int, rng) -> None:
        steps = int(rng.integers(1, self.max_move_steps + 1))
        grow = bool(rng.random() < 0.5)
        partner = self._partner(layers, i, giving=grow, rng=rng)
        if partner is None:
            return
        receiver, giver = (i, partner) if grow else (partner, i)
        new_giver = self._shift(layers[giver].channels, -steps)
        moved = layers[giver].channels - new_giver
        new_receiver = min(self.space.grid, key=lambda c: abs(c - (layers[receiver].channels + moved)))
        layers[giver] = LayerWidths(layers[giver].kv_heads, layers[giver].q_per_kv, new_giver)
        layers[receiver] = LayerWidths(layers[receiver].kv_heads, layers[receiver].q_per_kv, new_receiver)

    def _move_attention(self, layers: list[LayerWidths], i: int, rng) -> None:
        shapes = self.space.shapes
        w = layers[i]
        index = shapes.index((w.kv_heads, w.q_per_kv))
        new_index = int(np.clip(index + (1 if rng.random() < 0.5 else -1), 0, len(shapes) - 1))
        if new_index == index:
            return
        dims = self.space.dims
        delta = dims.attention_params(*shapes[new_index]) - dims.attention_params(*shapes[index])
        layers[i] = LayerWidths(*shapes[new_index], w.channels)
        # Pay for the attention change with MLP channels in another layer.
        partner = self._partner(layers, i, giving=delta > 0, rng=rng)
        if partner is None:
            return
        p = layers[partner]
        target = p.channels - delta / dims.mlp_params(1)
        layers[partner] = LayerWidths(p.kv_heads, p.q_per_kv, min(self.space.grid, key=lambda c: abs(c - target)))
