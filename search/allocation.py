"""One-shot allocation rules: how many units each layer keeps (METHODS.md section 3).

Each rule takes the model's dims and every layer's scores *in importance order* (see
:func:`space.slicing.sorted_scores`) and returns a :class:`~space.subnet.Subnet` on the budget.
Attention shapes are always GQA-valid; where several shapes keep the same number of heads
(6 heads of 3 groups x 3 = 2 x 3 or 3 x 2), the one keeping the most importance wins.
"""

from __future__ import annotations

from typing import Callable

import torch

from space.errors import UserError
from space.importance import LayerScores
from space.subnet import LayerWidths, ModelDims, Subnet, project


def kept_head_score(scores: LayerScores, dims: ModelDims, kv: int, q: int) -> float:
    """Summed score of the heads a prefix shape keeps (scores in importance order)."""
    return float(scores.heads.view(dims.num_kv_heads, dims.group_size)[:kv, :q].sum())


def best_shape(dims: ModelDims, scores: LayerScores, heads: float) -> tuple[int, int]:
    """The GQA-valid shape whose head count is nearest ``heads`` (ties: more heads), keeping the
    most importance among shapes of that count."""
    counts = sorted({kv * q for kv, q in dims.attention_shapes()})
    count = min(counts, key=lambda c: (abs(c - heads), -c))
    options = [(kv, q) for kv, q in dims.attention_shapes() if kv * q == count]
    return max(options, key=lambda s: (kept_head_score(scores, dims, *s), s[0]))


def _standardize(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else torch.tensor(0.0)
    return (x - x.mean()) / (std if std > 0 else 1.0)


def uniform(dims: ModelDims, scores: list[LayerScores], *, ratio: float, mlp_step: int = 1, **_) -> Subnet:
    """The same kept fraction of heads and of channels in every layer (Wanda-sp, magnitude-sp)."""
    layers = [
        LayerWidths(*best_shape(dims, s, ratio * dims.num_heads), int(round(ratio * dims.intermediate_size)))
        for s in scores
    ]
    return project(Subnet(dims, layers), ratio=ratio, mlp_step=mlp_step)


def uniform_mlp(dims: ModelDims, scores: list[LayerScores], *, ratio: float, mlp_step: int = 1, **_) -> Subnet:
    """Attention whole; the same MLP width in every layer, as wide as the budget allows."""
    layers = [LayerWidths(dims.num_kv_heads, dims.group_size, dims.intermediate_size)] * dims.num_layers
    return project(Subnet(dims, layers), ratio=ratio, mlp_step=mlp_step)


def global_threshold(
    dims: ModelDims,
    scores: list[LayerScores],
    *,
    ratio: float,
    standardized: bool = False,
    mlp_step: int = 1,
    attention_weight: float = 1.0,
    **_,
) -> Subnet:
    """One threshold over all layers' standardised scores, units weighted by parameter cost,
    cut where the kept parameters reach the budget (FLAP's AL-AM). A query head costs its q rows
    and o columns plus its share of the group's k and v rows. ``attention_weight`` > 1 makes heads
    harder to remove (NIRVANA's gamma)."""
    head_cost = dims.attention_params(1, dims.group_size) / dims.group_size
    channel_cost = dims.mlp_params(1)
    values, costs, owners = [], [], []
    for i, s in enumerate(scores):
        heads = s.heads if standardized else _standardize(s.heads)
        channels = s.channels if standardized else _standardize(s.channels)
        values += [heads * attention_weight, channels]
        costs += [torch.full_like(heads, head_cost), torch.full_like(channels, channel_cost)]
        owners += [torch.full((heads.numel(),), 2 * i), torch.full((channels.numel(),), 2 * i + 1)]
    value, cost, owner = torch.cat(values), torch.cat(costs), torch.cat(owners)
    order = torch.argsort(value, descending=True, stable=True)
    kept = torch.cumsum(cost[order], 0) <= ratio * dims.dense_block_params()
    counts = torch.bincount(owner[order][kept], minlength=2 * dims.num_layers)
    layers = []
    for i, s in enumerate(scores):
        kv, q = best_shape(dims, s, float(counts[2 * i]))
        layers.append(LayerWidths(kv, q, int(counts[2 * i + 1])))
    return project(Subnet(dims, layers), ratio=ratio, mlp_step=mlp_step)


ALLOCATIONS: dict[str, Callable[..., Subnet]] = {
    "uniform": uniform,
    "uniform-mlp": uniform_mlp,
    "global": global_threshold,
}


def allocate(name: str, dims: ModelDims, scores: list[LayerScores], *, ratio: float, **options) -> Subnet:
    if name not in ALLOCATIONS:
        raise UserError(f"unknown allocation {name!r}; known: {', '.join(ALLOCATIONS)}")
    return ALLOCATIONS[name](dims, scores, ratio=ratio, **options)
