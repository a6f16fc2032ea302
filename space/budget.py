"""The budget: which widths a layer may take (:class:`Bounds`) and the projection of any subnet
onto a kept ratio of block weights (:func:`project`), the step every allocation rule and every
search proposal ends with. Pure Python, like :mod:`space.subnet`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from space.subnet import LayerWidths, ModelDims, Subnet


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

    def min_ratio(self, dims: ModelDims) -> float:
        """The smallest block ratio these bounds allow (every layer at its smallest widths)."""
        attention = min(dims.attention_params(*s) for s in self.attention_shapes(dims))
        smallest = attention + dims.mlp_params(self.channel_grid(dims)[0])
        return smallest * dims.num_layers / dims.dense_block_params()

    def attention_shapes(self, dims: ModelDims) -> list[tuple[int, int]]:
        if self.shapes is None:
            return dims.attention_shapes()
        return sorted(self.shapes, key=lambda s: (s[0] * s[1], s[0]))


def _snap(value: float, grid: list[int]) -> int:
    """The grid value nearest ``value`` (grid sorted ascending)."""
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
