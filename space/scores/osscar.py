"""``osscar``: OSSCAR's selection (Meng et al., 2024) at the target budget, block by block on the
statistics of the pruned upstream model.

Uniform allocation: every layer keeps the same number of heads and of channels (the budget's
uniform widths, :func:`uniform_target`). Layer by layer, in order:

1. the second moment of o_proj's inputs is collected with the upstream layers already pruned and
   rectified (Týr's statistics, METHODS.md section 7; this layer still dense), the inputs kept;
2. heads: greedy OBS elimination (one head per step, space/scores/elimination.py); the GQA shape of
   the target head count that keeps the most of the order wins, as in the uniform allocation;
3. o_proj is refitted on the kept heads (least squares) and the removed heads' columns are zeroed,
   which removes them from the block's output;
4. the same for down_proj's channels with attention pruned: greedy elimination (16 channels per
   step), then OSSCAR's local swap search at the target width (:func:`swap_search`); its pass
   replays the attention from step 1's o_proj inputs (the refitted o_proj on them: the attention
   runs once per layer, space/residual_pass.py);
5. the block runs on the pruned stream and gives the next layer's inputs (in a plain-residual
   family, from step 4's pass: the stream after attention plus the refitted down_proj on its
   inputs); the dense weights of the layer are restored (the pipeline permutes, allocates and
   rectifies the dense model).

Scores: each unit's greedy-elimination score, plus 1 for the units the selection keeps, so a
prefix of the target width is exactly the selected set. Heads get no swap search (whole heads in
GQA groups: a swap would have to respect the group shape). The compensation that goes with this
order is least squares in ``upstream`` mode, on the same kind of statistics. Where the final
allocation's channel count differs from the provisional one (a layer whose chosen head shape
costs fewer parameters than the provisional shape), the prefix takes the next units of the order.
"""

from __future__ import annotations

import logging

import torch

from space.adapters import LayerAdapter, ModelAdapter
from space.budget import project
from space.calibration import BlockInputs, block_in, block_on, capture_block_inputs
from space.residual_pass import AttentionPass, attention_pass, last_linear_pass
from space.scores.base import LayerScores, ScoreContext, best_shape, kept_heads, register_score, weight64
from space.scores.elimination import CHANNELS_PER_STEP, damped, eliminate, swap_search, unit_scores
from space.subnet import LayerWidths, ModelDims, Subnet

log = logging.getLogger(__name__)

# The ridge of the refit that produces the pruned stream: the reformation's default
# (reform.lstsq.DEFAULT_DAMPING; space cannot import reform), so the stream is the one that the
# export's upstream least squares sees.
REFIT_DAMPING = 1e-4


def uniform_target(dims: ModelDims, ratio: float) -> Subnet:
    """The uniform widths on the budget, before any score is known (ties between head shapes of
    one count go to more KV groups)."""
    unknown = LayerScores(torch.zeros(dims.num_heads), torch.zeros(dims.num_kv_heads), torch.zeros(0))
    kv, q = best_shape(dims, unknown, ratio * dims.num_heads)
    layer = LayerWidths(kv, q, int(round(ratio * dims.intermediate_size)))
    return project(Subnet(dims, [layer] * dims.num_layers), ratio=ratio)


@register_score(
    "osscar",
    whole_model=True,
    uses_ratio=True,
    standardized=True,
    source="OSSCAR: greedy OBS + local swap search at the uniform target width, statistics from the "
           "pruned upstream model",
    dtype_passes=True,
    keeps_projection_inputs=True,
)
@torch.no_grad()
def osscar(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 8,
           progress=lambda it: it) -> list[LayerScores]:
    if ctx.ratio is None:
        raise ValueError("the osscar score needs the target ratio")
    dims = adapter.dims
    target = uniform_target(dims, ctx.ratio)
    inputs = capture_block_inputs(adapter, windows, batch_size=batch_size,
                                  execution_device=ctx.execution_device).to(dtype=ctx.pass_dtype)
    scores = []
    for layer, widths in progress(list(zip(adapter.layers, target.layers))):
        o, down = layer.attention_output(), layer.mlp_output()
        with block_on(layer.layer, ctx.execution_device):
            dense = (o.weight.data.clone(), down.weight.data.clone())
            try:
                heads, attention = _select_heads(layer, inputs, dims, ctx)
                channels, outputs = _channels_and_outputs(adapter, layer, inputs, attention, widths.channels, ctx)
                del attention  # o_proj's inputs of every window: one layer's at a time
                inputs = inputs.with_hidden(outputs)
            finally:
                o.weight.data, down.weight.data = dense
        scores.append(LayerScores(heads, heads.view(-1, dims.group_size).sum(1), channels))
    return scores


def _select_heads(layer: LayerAdapter, inputs: BlockInputs, dims: ModelDims,
                  ctx: ScoreContext) -> tuple[torch.Tensor, AttentionPass]:
    """The head scores (o_proj refitted on the kept heads) and the attention pass they came from."""
    o, ratio = layer.attention_output(), ctx.ratio
    with block_in(layer.layer, ctx.pass_dtype):  # the weights it was refitted to, rounded for the pass only
        attention = attention_pass(layer.layer, layer.attention, o, inputs, gram=True)
    gram = attention.stats.gram
    scores = unit_scores(eliminate(weight64(o), damped(gram), unit=dims.head_dim), dims.num_heads)
    layer_scores = LayerScores(scores, scores.view(-1, dims.group_size).sum(1), torch.zeros(dims.intermediate_size))
    kept = torch.zeros(dims.num_heads, dtype=torch.bool)
    kept[kept_heads(layer_scores, dims, *best_shape(dims, layer_scores, ratio * dims.num_heads))] = True
    _keep_columns(o, torch.nonzero(kept.repeat_interleave(dims.head_dim)).reshape(-1), gram)
    return scores, attention


def _channels_and_outputs(adapter: ModelAdapter, layer: LayerAdapter, inputs: BlockInputs, attention: AttentionPass,
                          width: int, ctx: ScoreContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """down_proj's channel scores (the layer refitted on its kept channels) and the block's outputs
    with it (in a plain-residual family from one pass: space/residual_pass.py), the attention
    replayed from its pass."""
    down = layer.mlp_output()
    with block_in(layer.layer, ctx.pass_dtype):
        passed = last_linear_pass(layer.layer, down, inputs, gram=True, plain=adapter.plain_residual,
                                  attention=attention)
    channels = _select_channels(layer, passed.stats.gram, width)
    with block_in(layer.layer, ctx.pass_dtype):
        return channels, passed.outputs(down)


def _select_channels(layer: LayerAdapter, gram: torch.Tensor, width: int) -> torch.Tensor:
    """down_proj's channels on ``gram``, its inputs' second moment with attention pruned."""
    down = layer.mlp_output()
    h = damped(gram)
    greedy = unit_scores(eliminate(weight64(down), h, step=CHANNELS_PER_STEP), down.in_features)
    start = torch.argsort(greedy, descending=True, stable=True)[:width]
    swaps = swap_search(weight64(down), h, start)
    log.info("osscar layer %d: %d swaps, refit error %.4g -> %.4g", layer.index, swaps.accepted, swaps.before,
             swaps.error)
    _keep_columns(down, swaps.kept, gram)
    greedy[swaps.kept] += 1.0
    return greedy


def _keep_columns(linear: torch.nn.Linear, kept: torch.Tensor, gram: torch.Tensor) -> None:
    """Refit ``linear`` on its ``kept`` input columns by least squares, Ŵ_K = W H[:, K] H_KK⁻¹, and
    zero the others: the pruned layer, in the dense shape."""
    h = damped(gram, REFIT_DAMPING)
    kept = kept.to(h.device)
    w = weight64(linear).to(h.device)
    pruned = torch.zeros_like(w)
    pruned[:, kept] = torch.linalg.solve(h[kept][:, kept], h[kept] @ w.T).T
    linear.weight.data = pruned.to(device=linear.weight.device, dtype=linear.weight.dtype)
