"""Importance scores: how much each unit of a layer matters (METHODS.md section 2).

A score function takes one layer (its real modules) and the statistics of that layer's
calibration inputs, and returns per-query-head, per-KV-group and per-channel scores, higher
meaning more important. Scores are registered by name; each declares the statistics it needs,
so the calibration pass collects only those.

Scores are computed at the input columns of o_proj and down_proj unless stated otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from space.activations import LayerStats, StatsRequest, walk_layers
from space.adapters import LayerAdapter, ModelAdapter
from space.errors import UserError


@dataclass
class LayerScores:
    """Scores of one layer's units, in the layer's current (original) order."""

    heads: torch.Tensor  # (num_heads,) one per query head
    groups: torch.Tensor  # (num_kv_heads,) one per KV group
    channels: torch.Tensor  # (intermediate_size,)

    def to(self, dtype=torch.float64) -> "LayerScores":
        return LayerScores(self.heads.to(dtype), self.groups.to(dtype), self.channels.to(dtype))


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    fn: Callable[..., LayerScores | list[LayerScores]]
    request: StatsRequest
    standardized: bool  # already comparable across layers (FLAP standardises inside the score)
    source: str
    whole_model: bool = False  # fn(adapter, windows, ctx, batch_size=, progress=) -> every layer's scores
    uses_ratio: bool = False  # depends on the target ratio (ScoreContext.ratio)

    @property
    def needs_data(self) -> bool:
        return bool(self.request.inputs) or self.whole_model


@dataclass(frozen=True)
class ScoreContext:
    head_dim: int
    group_size: int
    ratio: float | None = None  # the target budget, for scores that depend on it (newton)


SCORES: dict[str, ScoreSpec] = {}


def register_score(name: str, *, request: StatsRequest = StatsRequest((), ()), standardized: bool = False,
                   source: str = "", whole_model: bool = False, uses_ratio: bool = False):
    """Register a score. Per-layer scores take ``(layer, stats, ctx)`` and the statistics named by
    ``request``; ``whole_model`` scores (gradients, block outputs) make their own calibration pass
    and take ``(adapter, windows, ctx, *, batch_size, progress)``."""

    def decorate(fn):
        SCORES[name] = ScoreSpec(name, fn, request, standardized, source, whole_model, uses_ratio)
        return fn

    return decorate


def score_spec(name: str) -> ScoreSpec:
    if name not in SCORES:
        raise UserError(f"unknown importance score {name!r}; known: {', '.join(sorted(SCORES))}")
    return SCORES[name]


# --- helpers ---------------------------------------------------------------------------------


def _heads_from_columns(per_column: torch.Tensor, head_dim: int, reduce: str = "sum") -> torch.Tensor:
    per_head = per_column.reshape(-1, head_dim)
    return per_head.sum(1) if reduce == "sum" else per_head.mean(1)


def _groups_from_heads(heads: torch.Tensor, group_size: int) -> torch.Tensor:
    return heads.reshape(-1, group_size).sum(1)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def _weight(module) -> torch.Tensor:
    return module.weight.detach().double()


# --- the scores ------------------------------------------------------------------------------


@register_score("magnitude", request=StatsRequest((), ()), source="magnitude-sp (FLAP repo)")
def magnitude(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """‖W[:, j]‖₂ of the output projection; a head sums its columns."""
    o = _weight(layer.attention_output()).norm(dim=0)
    down = _weight(layer.mlp_output()).norm(dim=0)
    heads = _heads_from_columns(o, ctx.head_dim)
    return LayerScores(heads, _groups_from_heads(heads, ctx.group_size), down)


@register_score("wanda-sp", request=StatsRequest(("o", "down")), source="Wanda-sp (FLAP repo)")
def wanda_sp(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """mean_i |W_ij| · ‖X[:, j]‖₂; a head sums its columns."""
    o = _weight(layer.attention_output()).abs().mean(0) * stats.inputs["o"].norm
    down = _weight(layer.mlp_output()).abs().mean(0) * stats.inputs["down"].norm
    heads = _heads_from_columns(o, ctx.head_dim)
    return LayerScores(heads, _groups_from_heads(heads, ctx.group_size), down)


@register_score("fluctuation", request=StatsRequest(("o", "down")), standardized=True, source="FLAP (WIFV)")
def fluctuation(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    """Var_n(X[n, j]) · ‖W[:, j]‖₂², standardised per layer and module; a head is the mean of its
    columns' standardised squared scores (as FLAP's code does for o_proj)."""
    o = stats.inputs["o"].variance * _weight(layer.attention_output()).square().sum(0)
    down = stats.inputs["down"].variance * _weight(layer.mlp_output()).square().sum(0)
    heads = _heads_from_columns(_standardize(o.square()), ctx.head_dim, reduce="mean")
    groups = heads.reshape(-1, ctx.group_size).mean(1)
    return LayerScores(heads, groups, _standardize(down))


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
    q, k, v = (_weight(m) for m in layer.attention_inputs())
    gate, up = (_weight(m) for m in layer.mlp_inputs())
    o, down = _weight(layer.attention_output()), _weight(layer.mlp_output())

    def rows(w: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
        return (w.square() / inv_diag).sum(1)

    def columns(w: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
        return (w.square() / inv_diag).sum(0)

    head_cols = columns(o, inv["o"]) + rows(q, inv["q"])
    heads = _heads_from_columns(head_cols, ctx.head_dim)
    kv_rows = _heads_from_columns(rows(k, inv["q"]) + rows(v, inv["q"]), ctx.head_dim)
    groups = _groups_from_heads(heads, ctx.group_size) + kv_rows
    channels = columns(down, inv["down"]) + rows(gate, inv["gate"]) + rows(up, inv["gate"])
    return LayerScores(heads, groups, channels)


# --- driver ----------------------------------------------------------------------------------


def compute_scores(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    names: list[str],
    *,
    batch_size: int = 8,
    ratio: float | None = None,
    progress: Callable = lambda it: it,
) -> dict[str, list[LayerScores]]:
    """Every requested score for every layer: the per-layer ones from one shared block-by-block
    calibration pass, the whole-model ones from their own passes. ``ratio``: the target budget,
    for the scores that depend on it."""
    ctx = ScoreContext(adapter.dims.head_dim, adapter.dims.group_size, ratio)
    results: dict[str, list[LayerScores]] = {}
    for spec in (score_spec(n) for n in names):
        if spec.whole_model:
            layers = spec.fn(adapter, windows, ctx, batch_size=batch_size, progress=progress)
            results[spec.name] = [s.to() for s in layers]
    specs = [score_spec(n) for n in names if not score_spec(n).whole_model]
    request = StatsRequest((), ())
    for spec in specs:
        request = request.merged(spec.request)
    results.update({spec.name: [] for spec in specs})
    if not request.inputs:  # weights only: no calibration pass needed
        for layer in adapter.layers:
            for spec in specs:
                results[spec.name].append(spec.fn(layer, None, ctx).to())
        return results
    for stats in walk_layers(adapter, windows, request, batch_size=batch_size, progress=progress):
        layer = adapter.layers[stats.index]
        for spec in specs:
            results[spec.name].append(spec.fn(layer, stats, ctx).to())
    return results


def save_scores(path: Path, scores: dict[str, list[LayerScores]], meta: dict) -> None:
    """Cache scores as one torch file (written whole, then renamed into place)."""
    payload = {
        "meta": meta,
        "scores": {
            name: [{"heads": s.heads, "groups": s.groups, "channels": s.channels} for s in layers]
            for name, layers in scores.items()
        },
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_scores(path: Path, meta: dict) -> dict[str, list[LayerScores]] | None:
    """Cached scores, or None when absent or computed under other settings."""
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    if payload.get("meta") != meta:
        return None
    return {name: [LayerScores(**s) for s in layers] for name, layers in payload["scores"].items()}


# The scores that live in their own modules register themselves on import.
from space import gradients, influence, newton  # noqa: E402,F401
