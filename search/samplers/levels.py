"""Level switches: mutations that move width between two layers of the same kind in equal
parameter quanta (EvoPress, Týr-the-Pruner), so that a child has exactly its parent's size.

An MLP switch takes ``quantum`` channels from one layer and gives them to another; an attention
switch moves one layer to a smaller GQA shape and another to a larger one whose parameter counts
differ by the same amount; a switch across kinds moves one layer's attention to another shape and
gives or takes the same parameters in MLP channels of one layer (where that amount is a whole number
of grid steps), so that the split between attention and MLP is not fixed by the start. No projection
follows: the budget holds by construction, and a sub-layer may reach zero width where the width space
allows it (depth pruning inside the search).

Which layers give and receive is drawn from the exact least-squares residuals of the fitness
(:class:`UnitErrors`): a layer gives where losing the quantum adds little error after the refit,
and receives where gaining it removes much. Residuals are in units of the layer's output, so they
compare across layers. Half of the draws are uniform, because the residual is a proxy of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from search.widths import WidthSpace
from space.subnet import LayerWidths, Subnet


@dataclass(frozen=True)
class UnitErrors:
    """Per layer, the least-squares residual of its output projection after the refit (above the
    dense layer's): ``mlp[l][i]`` at the MLP width ``grid[i]``, ``attention[l][j]`` at ``shapes[j]``."""

    mlp: Sequence[np.ndarray]
    attention: Sequence[np.ndarray]


class LevelSwitches:
    """Budget-exact mutations over a width space.

    Args:
        space: the width space (its grid and shapes bound every move).
        errors: residuals that weight the choice of layers; None draws layers uniformly.
        attention_prob: chance that a switch is an attention switch.
        across_prob: chance that a switch trades attention for MLP width (0: the split between the
            kinds stays the start's; attention_prob + across_prob <= 1).
        max_switches: a child has 1..max_switches switches.
        explore: share of uniform draws mixed into the error-weighted ones.
    """

    def __init__(self, space: WidthSpace, *, errors: UnitErrors | None = None, attention_prob: float = 0.25,
                 max_switches: int = 3, explore: float = 0.5, across_prob: float = 0.0):
        if attention_prob + across_prob > 1:
            raise ValueError("attention_prob + across_prob must be at most 1")
        self.space = space
        self.errors = errors
        self.attention_prob = attention_prob if len(space.shapes) > 1 else 0.0
        self.across_prob = across_prob if len(space.shapes) > 1 else 0.0
        self.max_switches = max_switches
        self.explore = explore if errors is not None else 1.0
        self.channels = {c: i for i, c in enumerate(space.grid)}
        self.params = [space.dims.attention_params(*s) for s in space.shapes]

    def mutate(self, parent: Subnet, rng: np.random.Generator, quantum: int) -> Subnet:
        """A child of ``parent`` with the same parameter count; ``quantum``: MLP channels a switch moves."""
        layers = list(parent.layers)
        for _ in range(int(rng.integers(1, self.max_switches + 1))):
            # one draw decides the kind of switch (with across_prob 0, the draws of earlier versions)
            kind = rng.random()
            if kind < self.attention_prob and self._switch_attention(layers, rng):
                continue
            if kind >= 1 - self.across_prob and self._switch_across(layers, rng):
                continue
            self._switch_mlp(layers, rng, quantum)
        return Subnet(parent.dims, layers)

    # --- choosing layers --------------------------------------------------------------------

    def _draw(self, costs: np.ndarray, rng: np.random.Generator, *, cheap: bool) -> int:
        """An index, mixing uniform with weights ∝ 1 / cost (``cheap``) or ∝ cost."""
        n = len(costs)
        probs = np.full(n, self.explore / n)
        if self.explore < 1:
            safe = np.maximum(costs, 1e-12 * max(float(costs.max()), 1e-30))
            weights = 1.0 / safe if cheap else safe
            probs += (1 - self.explore) * weights / weights.sum()
        return int(rng.choice(n, p=probs / probs.sum()))

    def _mlp_error(self, layer: int, channels: int) -> float:
        return 0.0 if self.errors is None else float(self.errors.mlp[layer][self.channels[channels]])

    def _attention_error(self, layer: int, shape: int) -> float:
        return 0.0 if self.errors is None else float(self.errors.attention[layer][shape])

    # --- switches ---------------------------------------------------------------------------

    def _switch_mlp(self, layers: list[LayerWidths], rng: np.random.Generator, quantum: int) -> bool:
        givers = [i for i, w in enumerate(layers) if w.channels - quantum in self.channels]
        if not givers:
            return False
        cost = np.array([self._mlp_error(i, layers[i].channels - quantum) - self._mlp_error(i, layers[i].channels)
                         for i in givers])
        giver = givers[self._draw(cost, rng, cheap=True)]
        receivers = [i for i, w in enumerate(layers) if i != giver and w.channels + quantum in self.channels]
        if not receivers:
            return False
        gain = np.array([self._mlp_error(i, layers[i].channels) - self._mlp_error(i, layers[i].channels + quantum)
                         for i in receivers])
        receiver = receivers[self._draw(gain, rng, cheap=False)]
        for i, delta in ((giver, -quantum), (receiver, quantum)):
            w = layers[i]
            layers[i] = LayerWidths(w.kv_heads, w.q_per_kv, w.channels + delta)
        return True

    def _moves(self, layers: list[LayerWidths], down: bool) -> dict[int, list[tuple[int, int, float]]]:
        """Per parameter delta, the (layer, new shape, error change) of every attention move."""
        moves: dict[int, list[tuple[int, int, float]]] = {}
        for i, w in enumerate(layers):
            current = self.space.shapes.index((w.kv_heads, w.q_per_kv))
            for j, p in enumerate(self.params):
                delta = self.params[current] - p if down else p - self.params[current]
                if delta > 0:
                    change = abs(self._attention_error(i, j) - self._attention_error(i, current))
                    moves.setdefault(delta, []).append((i, j, change))
        return moves

    def _switch_attention(self, layers: list[LayerWidths], rng: np.random.Generator) -> bool:
        down, up = self._moves(layers, down=True), self._moves(layers, down=False)
        deltas = sorted(d for d in down if d in up and any(g[0] != r[0] for g in down[d] for r in up[d]))
        if not deltas:
            return False
        weights = 1.0 / np.square(np.array(deltas, dtype=float))  # small steps first: levels, not jumps
        delta = deltas[int(rng.choice(len(deltas), p=weights / weights.sum()))]
        giver, shape_g, _ = down[delta][self._draw(np.array([m[2] for m in down[delta]]), rng, cheap=True)]
        receivers = [m for m in up[delta] if m[0] != giver]
        if not receivers:
            return False
        receiver, shape_r, _ = receivers[self._draw(np.array([m[2] for m in receivers]), rng, cheap=False)]
        for i, shape in ((giver, shape_g), (receiver, shape_r)):
            layers[i] = LayerWidths(*self.space.shapes[shape], layers[i].channels)
        return True

    def _switch_across(self, layers: list[LayerWidths], rng: np.random.Generator) -> bool:
        """One layer's attention to another shape, one layer's MLP by the same parameters the other way."""
        channel = self.space.dims.mlp_params(1)
        by_direction = {down: self._moves(layers, down) for down in (True, False)}
        options = []  # (attention shrinks, parameter delta, channels)
        for down, by_delta in by_direction.items():
            for delta in by_delta:
                channels, rest = divmod(delta, channel)
                if rest == 0 and any(w.channels + (channels if down else -channels) in self.channels for w in layers):
                    options.append((down, delta, channels))
        if not options:
            return False
        weights = 1.0 / np.square(np.array([o[1] for o in options], dtype=float))  # small steps first
        down, delta, channels = options[int(rng.choice(len(options), p=weights / weights.sum()))]
        moves = by_direction[down][delta]
        layer, shape, _ = moves[self._draw(np.array([m[2] for m in moves]), rng, cheap=down)]
        change = channels if down else -channels
        mlp = [i for i, w in enumerate(layers) if w.channels + change in self.channels]
        # the MLP that receives where growing removes much error, or gives where shrinking adds little
        errors = np.array([abs(self._mlp_error(i, layers[i].channels + change) - self._mlp_error(i, layers[i].channels))
                           for i in mlp])
        target = mlp[self._draw(errors, rng, cheap=not down)]
        layers[layer] = LayerWidths(*self.space.shapes[shape], layers[layer].channels)
        w = layers[target]
        layers[target] = LayerWidths(w.kv_heads, w.q_per_kv, w.channels + change)
        return True


def depth_start(space: WidthSpace, ratio: float, errors: UnitErrors | None = None) -> Subnet:
    """Whole sub-layers removed, the cheapest first, while that brings the block ratio nearer
    ``ratio``: cheapest = least least-squares residual per parameter when ``errors`` are given
    (the output a sub-layer alone contributes), else the last layers first."""
    dims = space.dims
    dense = dims.dense_layer()
    sizes = {"attention": dims.attention_params(dense.kv_heads, dense.q_per_kv), "mlp": dims.mlp_params(dense.channels)}
    costs = []
    for i in range(dims.num_layers):
        for kind in sizes:
            if errors is None:
                cost = float(dims.num_layers - i)
            else:
                table = errors.attention[i] if kind == "attention" else errors.mlp[i]
                cost = float(table[0] - table[-1]) / sizes[kind]  # removed vs whole
            costs.append((cost, i, kind))
    target = (1 - ratio) * dims.dense_block_params()
    removed, layers = 0, [dense] * dims.num_layers
    for _, i, kind in sorted(costs):
        if abs(removed + sizes[kind] - target) < abs(removed - target):
            removed += sizes[kind]
            w = layers[i]
            layers[i] = LayerWidths(0, 0, w.channels) if kind == "attention" else LayerWidths(w.kv_heads, w.q_per_kv, 0)
    return Subnet(dims, layers)
