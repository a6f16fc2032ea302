"""Subnets: per-layer widths, their parameter and FLOP counts, and projection onto a budget.

Pure Python (no torch), so samplers and their tests run in milliseconds.

A layer's widths are ``(kv_heads, q_per_kv, channels)``: the kept KV groups, the query heads
kept in each kept group (the same for every group, so the layer stays a standard GQA layer),
and the kept MLP channels. Zero KV groups removes the attention sub-layer, zero channels the
MLP sub-layer. Because every layer is permuted into importance order once, the widths alone
say which units are kept: the first ``kv_heads`` groups, their first ``q_per_kv`` heads, and
the first ``channels`` channels.

The budget ``ratio`` is the kept fraction of block weights (q/k/v/o/gate/up/down of every
layer); embeddings, head, norms and biases are outside it (PROTOCOL.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelDims:
    """The shape of a dense model, as far as counting is concerned."""

    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    other_params: int = 0  # embeddings, head, norms: never pruned
    # Parameters outside the budget that still go with the units (for exact total counts):
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_fixed: int = 0  # per attention sub-layer whatever its width (e.g. q/k norms)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def attention_params(self, kv_heads: int, q_per_kv: int) -> int:
        return self.head_dim * self.hidden_size * 2 * kv_heads * (q_per_kv + 1)

    def mlp_params(self, channels: int) -> int:
        return 3 * self.hidden_size * channels

    def layer_params(self, widths: "LayerWidths") -> int:
        return self.attention_params(widths.kv_heads, widths.q_per_kv) + self.mlp_params(widths.channels)

    def layer_total_params(self, widths: "LayerWidths") -> int:
        """Every parameter of a layer's prunable sub-layers: weights, biases, per-head norms."""
        total = self.layer_params(widths)
        if widths.kv_heads:
            total += self.attention_fixed + self.o_bias * self.hidden_size
            total += self.qkv_bias * self.head_dim * (widths.heads + 2 * widths.kv_heads)
        if widths.channels:
            total += self.mlp_bias * (2 * widths.channels + self.hidden_size)
        return total

    def dense_layer(self) -> "LayerWidths":
        return LayerWidths(self.num_kv_heads, self.group_size, self.intermediate_size)

    def dense_block_params(self) -> int:
        return self.num_layers * self.layer_params(self.dense_layer())

    def attention_shapes(self) -> list[tuple[int, int]]:
        """Every GQA-valid ``(kv_heads, q_per_kv)``, ``(0, 0)`` included, by head count."""
        shapes = [(kv, q) for kv in range(1, self.num_kv_heads + 1) for q in range(1, self.group_size + 1)]
        return [(0, 0)] + sorted(shapes, key=lambda s: (s[0] * s[1], s[0]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerWidths:
    kv_heads: int
    q_per_kv: int
    channels: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.q_per_kv

    def check(self, dims: ModelDims, layer: int | None = None) -> None:
        where = f"layer {layer}: " if layer is not None else ""
        if not 0 <= self.kv_heads <= dims.num_kv_heads:
            raise ValueError(f"{where}kv_heads {self.kv_heads} outside [0, {dims.num_kv_heads}]")
        if (self.kv_heads == 0) != (self.q_per_kv == 0) or not 0 <= self.q_per_kv <= dims.group_size:
            raise ValueError(f"{where}q_per_kv {self.q_per_kv} invalid with kv_heads {self.kv_heads}")
        if not 0 <= self.channels <= dims.intermediate_size:
            raise ValueError(f"{where}channels {self.channels} outside [0, {dims.intermediate_size}]")


@dataclass(frozen=True)
class Subnet:
    dims: ModelDims
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != self.dims.num_layers:
            raise ValueError(f"{len(self.layers)} layer widths for a model of {self.dims.num_layers} layers")
        for i, widths in enumerate(self.layers):
            widths.check(self.dims, i)

    @classmethod
    def dense(cls, dims: ModelDims) -> "Subnet":
        return cls(dims, (dims.dense_layer(),) * dims.num_layers)

    # --- counting ---------------------------------------------------------------------------

    def block_params(self) -> int:
        return sum(self.dims.layer_params(w) for w in self.layers)

    def ratio(self) -> float:
        """Kept fraction of block weights."""
        return self.block_params() / self.dims.dense_block_params()

    def total_params(self) -> int:
        return sum(self.dims.layer_total_params(w) for w in self.layers) + self.dims.other_params

    def total_ratio(self) -> float:
        return self.total_params() / Subnet.dense(self.dims).total_params()

    def attention_ratio(self) -> float:
        dense = self.dims.attention_params(self.dims.num_kv_heads, self.dims.group_size) * self.dims.num_layers
        return sum(self.dims.attention_params(w.kv_heads, w.q_per_kv) for w in self.layers) / dense

    def mlp_ratio(self) -> float:
        return sum(w.channels for w in self.layers) / (self.dims.intermediate_size * self.dims.num_layers)

    def flops_per_token(self, seqlen: int) -> int:
        """Forward FLOPs per token of the decoder blocks for a causal window of ``seqlen``
        (2 per multiply-add; attention scores and values averaged over the causal positions)."""
        matmuls = 2 * self.block_params()
        attention = sum(4 * w.heads * self.dims.head_dim for w in self.layers) * (seqlen + 1) / 2
        return int(matmuls + attention)

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "dims": self.dims.to_dict(),
            "layers": [asdict(w) for w in self.layers],
            "block_params": self.block_params(),
            "ratio": self.ratio(),
            "total_params": self.total_params(),
            "total_ratio": self.total_ratio(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Subnet":
        return cls(ModelDims(**data["dims"]), tuple(LayerWidths(**w) for w in data["layers"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Subnet":
        return cls.from_dict(json.loads(text))


# --- projection onto a budget ---------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """What widths a layer may take: MLP channels on a grid anchored at the full width
    (``high, high - step, ...`` down to ``low``, plus 0 when ``allow_empty_mlp``), and a set of
    allowed attention shapes (``None``: every GQA-valid shape, empty attention included)."""

    step: int = 1
    low: int = 0
    high: int | None = None
    allow_empty_mlp: bool = True
    shapes: tuple[tuple[int, int], ...] | None = None

    def channel_grid(self, dims: ModelDims) -> list[int]:
        high = dims.intermediate_size if self.high is None else self.high
        grid = list(range(high, max(self.low, 1) - 1, -self.step))[::-1]
        if self.allow_empty_mlp and (not grid or grid[0] != 0):
            grid = [0] + grid
        return grid

    def attention_shapes(self, dims: ModelDims) -> list[tuple[int, int]]:
        if self.shapes is None:
            return dims.attention_shapes()
        return sorted(self.shapes, key=lambda s: (s[0] * s[1], s[0]))


def _snap(value: float, grid: list[int]) -> int:
    """The grid value nearest ``value`` (grid sorted ascending)."""
    import bisect

    i = bisect.bisect_left(grid, value)
    if i == 0:
        return grid[0]
    if i == len(grid):
        return grid[-1]
    return grid[i] if grid[i] - value <= value - grid[i - 1] else grid[i - 1]


def _scaled_shape(shapes: list[tuple[int, int]], kv: int, q: int, beta: float) -> tuple[int, int]:
    """The allowed attention shape with the most heads up to ``beta`` times those of ``(kv, q)``,
    among the shapes contained in it (beta <= 1) or containing it (beta > 1), so that the kept
    heads stay nested; ties keep more KV groups. Falls back to the nearest allowed shape."""
    if beta <= 1:
        options = [s for s in shapes if s[0] <= kv and s[1] <= q]
        goal = beta * kv * q
    else:
        options = [s for s in shapes if s[0] >= kv and s[1] >= q]
        goal = beta * max(kv * q, 1)
    fitting = [s for s in options if s[0] * s[1] <= goal + 1e-9]
    if not fitting:
        fitting = [min(shapes, key=lambda s: (abs(s[0] * s[1] - goal), -s[0]))]
    return max(fitting, key=lambda s: (s[0] * s[1], s[0]))


def _fill_mlp(dims: ModelDims, shapes, channels, target: int, grid: list[int]) -> list[int] | None:
    """Channels per layer on ``grid``, proportional to ``channels``, whose params plus the
    attention of ``shapes`` come nearest ``target``; None when no grid width can reach it."""
    budget = target - sum(dims.attention_params(kv, q) for kv, q in shapes)
    unit = dims.mlp_params(1)
    coarsest = max((b - a for a, b in zip(grid, grid[1:])), default=1)
    lowest, highest = grid[0] * dims.num_layers, grid[-1] * dims.num_layers
    if budget < unit * (lowest - coarsest / 2) or budget > unit * (highest + coarsest / 2):
        return None
    base = [max(c, 0) for c in channels]
    if sum(base) == 0:
        base = [dims.intermediate_size] * dims.num_layers
    goal = budget / unit

    def widths(alpha: float) -> list[int]:
        return [_snap(alpha * c, grid) for c in base]

    lo, hi = 0.0, 2.0 * grid[-1] / max(1, min(c for c in base if c > 0))
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(widths(mid)) < goal:
            lo = mid
        else:
            hi = mid
    result = widths(hi)
    index = {value: i for i, value in enumerate(grid)}
    # Settle the rounding remainder one grid step at a time where rounding cost the most.
    for _ in range(4 * dims.num_layers):
        excess = sum(result) - goal
        if excess > 0:
            movable = [i for i in range(len(result)) if index[result[i]] > 0]
            if not movable:
                break
            i = min(movable, key=lambda i: hi * base[i] - result[i])
            smaller = grid[index[result[i]] - 1]
            if abs(excess - (result[i] - smaller)) >= abs(excess):
                break
            result[i] = smaller
        else:
            movable = [i for i in range(len(result)) if index[result[i]] < len(grid) - 1]
            if not movable:
                break
            i = max(movable, key=lambda i: hi * base[i] - result[i])
            larger = grid[index[result[i]] + 1]
            if abs(excess + (larger - result[i])) >= abs(excess):
                break
            result[i] = larger
    return result


def project(subnet: Subnet, *, ratio: float, bounds: Bounds | None = None, mlp_step: int = 1,
            tolerance: float = 0.005) -> Subnet:
    """The subnet nearest ``subnet`` whose block ratio is ``ratio`` within ``tolerance``
    (relative), inside ``bounds`` (default: any width, MLP in steps of ``mlp_step``).

    The attention shapes of the proposal are kept and the MLP widths absorb the difference,
    scaled together so the proposal's profile survives. Only when no MLP width can absorb it
    (attention alone is over budget, or the budget exceeds attention plus full MLPs) are the
    attention shapes scaled too.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    dims = subnet.dims
    bounds = bounds or Bounds(step=mlp_step)
    grid = bounds.channel_grid(dims)
    allowed = bounds.attention_shapes(dims)
    target = int(round(ratio * dims.dense_block_params()))
    shapes = [(w.kv_heads, w.q_per_kv) for w in subnet.layers]
    shapes = [s if s in allowed else _scaled_shape(allowed, *s, 1.0) for s in shapes]
    channels = [w.channels for w in subnet.layers]

    filled = _fill_mlp(dims, shapes, channels, target, grid)
    if filled is None:
        # Scale attention by beta; pick the beta whose shapes leave the MLP a reachable budget.
        attention_now = sum(dims.attention_params(kv, q) for kv, q in shapes)
        shrink = target < attention_now + dims.mlp_params(grid[0]) * dims.num_layers
        lo, hi = (0.0, 1.0) if shrink else (1.0, float(dims.num_heads))
        for _ in range(50):
            beta = (lo + hi) / 2
            trial = [_scaled_shape(allowed, kv, q, beta) for kv, q in shapes]
            fits = _fill_mlp(dims, trial, channels, target, grid) is not None
            if shrink:
                lo, hi = (beta, hi) if fits else (lo, beta)
            else:
                lo, hi = (lo, beta) if fits else (beta, hi)
        beta = lo if shrink else hi
        shapes = [_scaled_shape(allowed, kv, q, beta) for kv, q in shapes]
        filled = _fill_mlp(dims, shapes, channels, target, grid)
        if filled is None:
            raise ValueError(f"no subnet within the bounds reaches ratio {ratio}")
    result = Subnet(dims, tuple(LayerWidths(kv, q, c) for (kv, q), c in zip(shapes, filled)))
    if not math.isclose(result.ratio(), ratio, rel_tol=tolerance):
        raise ValueError(
            f"projection reached ratio {result.ratio():.4f}, not {ratio} within {tolerance:.1%} "
            f"(the MLP step {bounds.step} or the bounds are too coarse for this budget)"
        )
    return result
