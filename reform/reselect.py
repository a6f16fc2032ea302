"""Re-selecting each layer's kept units at export (``ReformSpec(select="obs")``, upstream mode).

The search scores prefixes of one importance order, fixed before it starts and computed on the
dense model's statistics (or, for ``osscar``, at the uniform width). Once the winner's widths are
known, the upstream walk has each output projection's statistics on the inputs the pruned upstream
model really gives it (its own sub-layer whole), so the units can be chosen again for exactly those
widths and that stream, by the same criterion the least squares then minimises, the refit error

    E(K) = tr(W H Wᵀ) − tr(W H[:, K] H[K, K]⁻¹ H[K, :] Wᵀ),   H = XᵀX + λI (λ: ZipLM's ridge)

(space/scores/elimination.py). The widths do not change, so the budget holds exactly. Heads: every
set of the layer's GQA shape (``kv_heads`` groups of ``q_per_kv`` heads) is tried when there are
few (SmolLM2: at most 81), else greedy OBS elimination ranks them. Channels: greedy OBS elimination
(16 a step), then OSSCAR's swap search at the width. The layer is permuted in place so that the
chosen units are its prefix, and its order (original indices) changes with it.
"""

from __future__ import annotations

import itertools
import math

import torch

from space.adapters import LayerAdapter
from space.input_stats import InputStats
from space.order import LayerOrder, expand, orders_from_kept, permute_layer
from space.scores.base import weight64
from space.scores.elimination import CHANNELS_PER_STEP, damped, eliminate, refit_error, swap_search, unit_scores
from space.subnet import LayerWidths, ModelDims

EXACT_HEAD_SETS = 256  # enumerate every head set of the shape up to this many, else rank greedily


def _head_sets(dims: ModelDims, kv: int, q: int):
    """Every kept head set of the shape: ``kv`` groups, ``q`` heads in each (flat head indices)."""
    for groups in itertools.combinations(range(dims.num_kv_heads), kv):
        for within in itertools.product(*(itertools.combinations(range(dims.group_size), q) for _ in groups)):
            yield [g * dims.group_size + h for g, heads in zip(groups, within) for h in heads]


def chosen_heads(weight: torch.Tensor, gram: torch.Tensor, dims: ModelDims, widths: LayerWidths) -> list[int]:
    """The heads (flat indices of the layer as it is) to keep at ``widths``' GQA shape: the set of
    least refit error, by enumeration when the shape has few, else the greedy order's best."""
    h = damped(gram)
    w = weight.detach().double().to(h.device)
    b, total = w @ h, float(torch.einsum("ij,jk,ik->", w, h, w))
    if math.comb(dims.num_kv_heads, widths.kv_heads) * math.comb(dims.group_size, widths.q_per_kv) ** widths.kv_heads \
            <= EXACT_HEAD_SETS:
        return min(_head_sets(dims, widths.kv_heads, widths.q_per_kv),
                   key=lambda heads: refit_error(b, h, expand(torch.tensor(heads), dims.head_dim).to(h.device), total))
    scores = unit_scores(eliminate(w, h, unit=dims.head_dim), dims.num_heads).view(dims.num_kv_heads, dims.group_size)
    best = torch.sort(scores, dim=1, descending=True, stable=True)
    value = best.values[:, :widths.q_per_kv].sum(1)  # a group is worth its best q heads
    groups = torch.sort(value, descending=True, stable=True).indices[:widths.kv_heads]
    return [int(g) * dims.group_size + int(r) for g in groups for r in best.indices[g, :widths.q_per_kv]]


def chosen_channels(weight: torch.Tensor, gram: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` channels to keep: the greedy order's prefix, improved by swaps."""
    h = damped(gram)
    greedy = unit_scores(eliminate(weight, h, step=CHANNELS_PER_STEP), weight.shape[1])
    start = torch.argsort(greedy, descending=True, stable=True)[:width]
    return swap_search(weight, h, start).kept


def reselect(layer: LayerAdapter, name: str, widths: LayerWidths, stats: InputStats, dims: ModelDims,
             order: LayerOrder, *, centred: bool = False, held: list[torch.Tensor] | None = None) -> LayerOrder:
    """Choose output projection ``name``'s kept units again on ``stats`` (its inputs, all columns),
    permute ``layer`` and ``stats`` so that they are the prefix, and return the layer's new order.
    ``centred``: by the refit error of a least squares with an intercept (on the centred moment).
    ``held``: the inputs themselves, per batch (their last dimension the columns), permuted in place too."""
    gram = stats.centred_gram() if centred else stats.gram
    if name == "o":
        heads = chosen_heads(weight64(layer.attention_output()), gram, dims, widths)
        kept = {"kv_heads": list(dict.fromkeys(h // dims.group_size for h in heads)), "heads": heads, "channels": []}
    else:
        channels = chosen_channels(weight64(layer.mlp_output()), gram, widths.channels)
        kept = {"kv_heads": list(range(dims.num_kv_heads)), "heads": list(range(dims.num_heads)),
                "channels": sorted(channels.tolist())}
    step = orders_from_kept([kept], dims)[0]  # indices of the layer as it is: the chosen units first
    columns = expand(step.heads.reshape(-1), dims.head_dim) if name == "o" else step.channels
    permute_layer(layer, step, dims)
    stats.reorder(columns)
    if held is not None:
        held[:] = [x[..., columns.to(x.device)] for x in held]
    flat = order.heads.reshape(-1)
    return LayerOrder(order.groups[step.groups], flat[step.heads], order.channels[step.channels])
