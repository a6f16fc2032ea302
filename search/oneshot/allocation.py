"""One-shot allocation rules: how many units each layer keeps (METHODS.md section 3).

Each rule takes the model's dims and every layer's scores *in importance order* (see
:func:`space.order.sorted_scores`) and returns a :class:`~space.subnet.Subnet` on the budget.
Attention shapes are always GQA-valid; where several shapes keep the same number of heads
(6 heads of 3 groups x 3 = 2 x 3 or 3 x 2), the one keeping the most importance wins.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from space.errors import UserError
from space.budget import Bounds, project
from space.scores.base import LayerScores, best_shape, standardize
from space.subnet import LayerWidths, ModelDims, Subnet


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
        heads = s.heads if standardized else standardize(s.heads)
        channels = s.channels if standardized else standardize(s.channels)
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


def uniform_inner(dims: ModelDims, scores: list[LayerScores], *, ratio: float, first: int = 4, last: int = 2,
                  mlp_step: int = 1, **_) -> Subnet:
    """LLM-Pruner: the first ``first`` and last ``last`` layers whole, the same fraction of heads
    and channels in the others. ``ratio`` stays the kept fraction of all block weights, so the
    pruned layers keep less: (ratio·L − first − last) / (L − first − last) of theirs."""
    inner = list(range(first, dims.num_layers - last))
    inner_ratio = (ratio * dims.num_layers - (dims.num_layers - len(inner))) / max(len(inner), 1)
    if not inner or inner_ratio <= 0:
        raise UserError(f"ratio {ratio} cannot be reached with layers 0..{first - 1} and the last {last} kept "
                        f"whole ({dims.num_layers} layers)")
    part = uniform(dataclasses.replace(dims, num_layers=len(inner)), [scores[i] for i in inner],
                   ratio=min(inner_ratio, 1.0), mlp_step=mlp_step)
    layers = [dims.dense_layer()] * dims.num_layers
    layers[first : first + len(inner)] = part.layers
    return Subnet(dims, layers)


def two_thresholds(dims: ModelDims, scores: list[LayerScores], *, ratio: float, gamma: float = 3.0,
                   mlp_step: int = 1, **_) -> Subnet:
    """NIRVANA: whole KV groups and MLP channels ranked separately across all layers (scores
    comparable across layers), attention pruned ``gamma`` times less than the MLP (as fractions
    of their parameters), the two cuts set so that the kept parameters meet the budget."""
    attention = dims.num_layers * dims.attention_params(dims.num_kv_heads, dims.group_size)
    mlp = dims.num_layers * dims.mlp_params(dims.intermediate_size)
    removed = (1 - ratio) * (attention + mlp)
    mlp_cut = min(removed / (attention / gamma + mlp), 1.0)
    attention_cut = min((removed - mlp_cut * mlp) / attention, 1.0)
    groups = torch.cat([s.groups for s in scores])
    channels = torch.cat([s.channels for s in scores])
    kept_groups = _top_counts(groups, round((1 - attention_cut) * groups.numel()), dims.num_kv_heads)
    kept_channels = _top_counts(channels, round((1 - mlp_cut) * channels.numel()), dims.intermediate_size)
    whole_groups = tuple((kv, dims.group_size) for kv in range(1, dims.num_kv_heads + 1)) + ((0, 0),)
    layers = [LayerWidths(kv, dims.group_size if kv else 0, c) for kv, c in zip(kept_groups, kept_channels)]
    return project(Subnet(dims, layers), ratio=ratio, bounds=Bounds(step=mlp_step, shapes=whole_groups))


def _top_counts(values: torch.Tensor, keep: int, per_layer: int) -> list[int]:
    """How many of each layer's units (``per_layer`` each, concatenated) are among the ``keep``
    largest values overall."""
    order = torch.argsort(values, descending=True, stable=True)[:keep]
    return torch.bincount(order // per_layer, minlength=values.numel() // per_layer).tolist()


def block_score(scores: LayerScores) -> float:
    """A depth score's value for the whole block (every unit of the block carries it)."""
    return float(scores.channels.mean())


def drop_blocks(dims: ModelDims, scores: list[LayerScores], *, ratio: float, **_) -> Subnet:
    """ShortGPT: remove the whole blocks of lowest score, as many as the budget asks; a removed
    block has no attention and no MLP (the identity). Only ratios within 0.5 % of a multiple of
    1/L are reachable."""
    count = round((1 - ratio) * dims.num_layers)
    reached = 1 - count / dims.num_layers
    if not math.isclose(reached, ratio, rel_tol=0.005):
        raise UserError(f"dropping whole blocks of a {dims.num_layers}-layer model reaches ratio {reached:.4f}, "
                        f"not {ratio} within 0.5 %; ask for a multiple of 1/{dims.num_layers}")
    dropped = set(sorted(range(dims.num_layers), key=lambda i: (block_score(scores[i]), i))[:count])
    empty = LayerWidths(0, 0, 0)
    return Subnet(dims, [empty if i in dropped else dims.dense_layer() for i in range(dims.num_layers)])


ALLOCATIONS: dict[str, Callable[..., Subnet]] = {
    "uniform": uniform,
    "uniform-mlp": uniform_mlp,
    "global": global_threshold,
    "uniform-inner": uniform_inner,
    "two-thresholds": two_thresholds,
    "drop-blocks": drop_blocks,
}


def allocate(name: str, dims: ModelDims, scores: list[LayerScores], *, ratio: float, **options) -> Subnet:
    if name not in ALLOCATIONS:
        raise UserError(f"unknown allocation {name!r}; known: {', '.join(ALLOCATIONS)}")
    return ALLOCATIONS[name](dims, scores, ratio=ratio, **options)
