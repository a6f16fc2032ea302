"""Importance scores: how much each unit of a layer matters (METHODS.md section 2).

A score function takes one layer (its real modules) and the statistics of that layer's
calibration inputs, and returns per-query-head, per-KV-group and per-channel scores, higher
meaning more important. Scores are registered by name (:func:`register_score`); each declares the
statistics it needs, so one calibration pass (:func:`compute_scores`) collects only those. The
score modules of this package (statistics, gradients, newton, influence) register themselves
when ``space.scores`` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from space.adapters import ModelAdapter
from space.calibration import StatsRequest, block_on, walk_layers
from space.errors import UserError
from space.subnet import ModelDims


@dataclass
class LayerScores:
    """Scores of one layer's units, in the layer's current (original) order."""

    heads: torch.Tensor  # (num_heads,) one per query head
    groups: torch.Tensor  # (num_kv_heads,) one per KV group
    channels: torch.Tensor  # (intermediate_size,)

    def to(self, dtype=torch.float64) -> "LayerScores":
        """In ``dtype``, in host memory (where they are cached and ordered from)."""
        return LayerScores(*(t.to(device="cpu", dtype=dtype) for t in (self.heads, self.groups, self.channels)))


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    fn: Callable[..., LayerScores | list[LayerScores]]
    request: StatsRequest
    standardized: bool  # already comparable across layers (FLAP standardises inside the score)
    source: str
    whole_model: bool = False  # fn(adapter, windows, ctx, batch_size=, progress=) -> every layer's scores
    uses_ratio: bool = False  # depends on the target ratio (ScoreContext.ratio)
    version: int = 1  # raised when the formula changes, so that cached scores of the old one are not served
    streamed: bool = True  # runs block by block (on ScoreContext.execution_device); False: needs the whole model
    dtype_passes: bool = False  # a whole-model score whose passes run in ScoreContext.pass_dtype
    keeps_projection_inputs: bool = False  # holds o_proj's and down_proj's inputs of every window for one block

    @property
    def needs_data(self) -> bool:
        return bool(self.request.inputs) or self.whole_model

    @property
    def honours_pass_dtype(self) -> bool:
        """Its calibration passes run in a requested pass dtype (the per-layer scores' shared pass
        does, where they need one; of the whole-model scores, those that declare it)."""
        return self.dtype_passes or (not self.whole_model and self.needs_data)


@dataclass(frozen=True)
class ScoreContext:
    head_dim: int
    group_size: int
    ratio: float | None = None  # the target budget, for scores that depend on it (newton)
    execution_device: str | None = None  # where blocks run when the model is kept elsewhere (streamed)
    pass_dtype: torch.dtype | None = None  # the dtype blocks run in for the statistics (None: the model's)


SCORES: dict[str, ScoreSpec] = {}


def register_score(name: str, *, request: StatsRequest = StatsRequest((), ()), standardized: bool = False,
                   source: str = "", whole_model: bool = False, uses_ratio: bool = False, version: int = 1,
                   streamed: bool = True, dtype_passes: bool = False, keeps_projection_inputs: bool = False):
    """Register a score. Per-layer scores take ``(layer, stats, ctx)`` and the statistics named by
    ``request``; ``whole_model`` scores (gradients, block outputs) make their own calibration pass
    and take ``(adapter, windows, ctx, *, batch_size, progress)``. ``version``: raise it whenever
    the formula changes (it keys the score cache). ``streamed``: a whole-model score that still runs
    block by block, on ``ctx.execution_device`` (else the whole model is moved there for its pass).
    ``dtype_passes``: a whole-model score that runs its blocks in ``ctx.pass_dtype``.
    ``keeps_projection_inputs``: its pass holds o_proj's and down_proj's inputs of every window for one block
    (space/residual_pass.py; the memory plan counts them)."""

    def decorate(fn):
        SCORES[name] = ScoreSpec(name, fn, request, standardized, source, whole_model, uses_ratio, version, streamed,
                                 dtype_passes, keeps_projection_inputs)
        return fn

    return decorate


def score_spec(name: str) -> ScoreSpec:
    if name not in SCORES:
        raise UserError(f"unknown importance score {name!r}; known: {', '.join(sorted(SCORES))}")
    return SCORES[name]


# --- helpers shared by the scores ------------------------------------------------------------


def heads_from_columns(per_column: torch.Tensor, head_dim: int, reduce: str = "sum") -> torch.Tensor:
    """Per query head, the sum (or mean) of its ``head_dim`` o_proj columns' scores."""
    per_head = per_column.reshape(-1, head_dim)
    return per_head.sum(1) if reduce == "sum" else per_head.mean(1)


def groups_from_heads(heads: torch.Tensor, group_size: int) -> torch.Tensor:
    return heads.reshape(-1, group_size).sum(1)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std, so that scores of different layers share one scale; a constant (or
    single-element) x is only centred."""
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    return (x - x.mean()) / (std if std > 0 else 1.0)


def weight64(module) -> torch.Tensor:
    return module.weight.detach().double()


def kept_heads(scores: LayerScores, dims: ModelDims, kv: int, q: int) -> torch.Tensor:
    """The query heads a shape of ``kv`` groups x ``q`` heads keeps: the ``kv`` best groups and, in
    each, its ``q`` best heads (the prefix of the importance order, space/order.py)."""
    groups = torch.sort(scores.groups, descending=True, stable=True).indices[:kv]
    heads = scores.heads.view(dims.num_kv_heads, dims.group_size)[groups]
    within = torch.sort(heads, descending=True, stable=True).indices[:, :q]
    return (groups[:, None] * dims.group_size + within).reshape(-1)


def kept_head_score(scores: LayerScores, dims: ModelDims, kv: int, q: int) -> float:
    """Summed score of the heads a shape keeps."""
    return float(scores.heads[kept_heads(scores, dims, kv, q)].sum())


def best_shape(dims: ModelDims, scores: LayerScores, heads: float) -> tuple[int, int]:
    """The GQA-valid shape whose head count is nearest ``heads`` (ties: more heads), keeping the
    most importance among shapes of that count."""
    counts = sorted({kv * q for kv, q in dims.attention_shapes()})
    count = min(counts, key=lambda c: (abs(c - heads), -c))
    options = [(kv, q) for kv, q in dims.attention_shapes() if kv * q == count]
    return max(options, key=lambda s: (kept_head_score(scores, dims, *s), s[0]))


# --- driver ----------------------------------------------------------------------------------


def compute_scores(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    names: list[str],
    *,
    batch_size: int = 8,
    ratio: float | None = None,
    execution_device: str | None = None,
    pass_dtype: torch.dtype | None = None,
    progress: Callable = lambda it: it,
) -> dict[str, list[LayerScores]]:
    """Every requested score for every layer: the per-layer ones from one shared block-by-block
    calibration pass, the whole-model ones from their own passes. ``ratio``: the target budget,
    for the scores that depend on it. ``execution_device``: run the blocks there, one at a time,
    the model staying where it is (see :func:`space.calibration.walk_layers`). ``pass_dtype``: the
    blocks run in it for the scores that honour it (:attr:`ScoreSpec.honours_pass_dtype`)."""
    ctx = ScoreContext(adapter.dims.head_dim, adapter.dims.group_size, ratio, execution_device, pass_dtype)
    results: dict[str, list[LayerScores]] = {}
    for spec in (score_spec(n) for n in names):
        if spec.whole_model:
            with block_on(adapter.model, None if spec.streamed else execution_device):
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
    for stats in walk_layers(adapter, windows, request, batch_size=batch_size, execution_device=execution_device,
                             pass_dtype=pass_dtype, progress=progress):
        layer = adapter.layers[stats.index]
        for spec in specs:
            results[spec.name].append(spec.fn(layer, stats, ctx).to())
    return results
