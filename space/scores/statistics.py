"""Scores from weights and input statistics of one layer: ``magnitude``, ``wanda-sp``,
``fluctuation`` (FLAP) and ``obs`` (the search paper's initialisation).

Scores are computed at the input columns of o_proj and down_proj unless stated otherwise.
"""

from __future__ import annotations

import torch

from space.adapters import LayerAdapter
from space.calibration import LayerStats, StatsRequest
from space.scores.base import (
    LayerScores,
    ScoreContext,
    groups_from_heads,
    heads_from_columns,
    register_score,
    standardize,
    weight64,
)


@register_score("magnitude", request=StatsRequest((), ()), source="magnitude-sp (FLAP repo)")
def magnitude(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """‖W[:, j]‖₂ of the output projection; a head sums its columns."""
    o = weight64(layer.attention_output()).norm(dim=0)
    down = weight64(layer.mlp_output()).norm(dim=0)
    heads = heads_from_columns(o, ctx.head_dim)
    return LayerScores(heads, groups_from_heads(heads, ctx.group_size), down)


@register_score("wanda-sp", request=StatsRequest(("o", "down")), source="Wanda-sp (FLAP repo)")
def wanda_sp(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """mean_i |W_ij| · ‖X[:, j]‖₂; a head sums its columns."""
    o = weight64(layer.attention_output()).abs().mean(0) * stats.inputs["o"].norm
    down = weight64(layer.mlp_output()).abs().mean(0) * stats.inputs["down"].norm
    heads = heads_from_columns(o, ctx.head_dim)
    return LayerScores(heads, groups_from_heads(heads, ctx.group_size), down)


@register_score("fluctuation", request=StatsRequest(("o", "down")), standardized=True, source="FLAP (WIFV)")
def fluctuation(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """Var_n(X[n, j]) · ‖W[:, j]‖₂², standardised per layer and module; a head is the mean of its
    columns' standardised squared scores (as FLAP's code does for o_proj)."""
    o = stats.inputs["o"].variance * weight64(layer.attention_output()).square().sum(0)
    down = stats.inputs["down"].variance * weight64(layer.mlp_output()).square().sum(0)
    heads = heads_from_columns(standardize(o.square()), ctx.head_dim, reduce="mean")
    groups = heads.reshape(-1, ctx.group_size).mean(1)
    return LayerScores(heads, groups, standardize(down))


def _obs_inverse_diag(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """diag of (2C + λI)⁻¹ with λ = ``damp`` · mean diag(2C)."""
    h = 2 * gram
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()


@register_score(
    "obs",
    request=StatsRequest(("q", "o", "gate", "down"), gram=("q", "o", "gate", "down")),
    source="Search for Efficient LLMs, eq. 1",
)
def obs(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """Φ_ij = W_ij² / [(2C + λI)⁻¹]_jj summed over a unit's weights: the output projection's
    column (with that projection's input C) plus the unit's rows of the input projections (with
    the layer's own input C)."""
    inv = {name: _obs_inverse_diag(stats.inputs[name].gram) for name in ("q", "o", "gate", "down")}
    q, k, v = (weight64(m) for m in layer.attention_inputs())
    gate, up = (weight64(m) for m in layer.mlp_inputs())
    o, down = weight64(layer.attention_output()), weight64(layer.mlp_output())

    def rows(w: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
        return (w.square() / inv_diag).sum(1)

    def columns(w: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
        return (w.square() / inv_diag).sum(0)

    head_cols = columns(o, inv["o"]) + rows(q, inv["q"])
    heads = heads_from_columns(head_cols, ctx.head_dim)
    kv_rows = heads_from_columns(rows(k, inv["q"]) + rows(v, inv["q"]), ctx.head_dim)
    groups = groups_from_heads(heads, ctx.group_size) + kv_rows
    channels = columns(down, inv["down"]) + rows(gate, inv["gate"]) + rows(up, inv["gate"])
    return LayerScores(heads, groups, channels)
