"""Forward-only scores of how much a unit or a block changes its block's output:
``block-influence`` (ShortGPT, whole blocks) and ``bip`` (LLM-BIP, heads, KV groups, channels).

Both walk the blocks once (the calibration loop of space/calibration.py), feeding each block the
previous block's output, and need no gradients.

``bip`` as implemented here (LLM-BIP's code is not public): the score of a unit is the deviation of
its own block's output, over the calibration tokens, when that unit alone is removed, relative to
the norm of that block output, so that scores of all layers share one scale:

* MLP channel j: ``‖W_down[:, j]‖₂ · ‖a_j‖₂ / ‖H_out‖_F`` (a_j: the channel's activation over
  tokens). This is exact: the channel's contribution enters the residual stream directly.
* attention head (or KV group) with o_proj columns S: ``‖W_o[:, S] A_S‖_F · (1 + ĝ) / ‖H_out‖_F``,
  the first factor exact from the o_proj input second moments (``trace(W_Sᵀ W_S C_SS)``), and
  ``1 + ĝ`` standing in for the Lipschitz bound of the rest of the block (residual + norm + MLP),
  with ĝ = ‖MLP output‖_F / ‖MLP-branch input (the residual stream after attention)‖_F measured
  on the same tokens. That is an average gain, not a worst-case bound: the worst-case product of
  operator norms is loose by orders of magnitude and would rank every head above every channel.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from space.calibration import block_on, capture_block_inputs, run_block
from space.adapters import ModelAdapter
from space.scores.base import LayerScores, ScoreContext, register_score


def _filled(value: float, ctx: ScoreContext, adapter: ModelAdapter) -> LayerScores:
    """Every unit of a block carrying the block's score (the permutation then stays identity)."""
    d = adapter.dims

    def full(n: int) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.float64)

    return LayerScores(full(d.num_heads), full(d.num_kv_heads), full(d.intermediate_size))


@register_score("block-influence", whole_model=True, standardized=True, source="ShortGPT (block influence)")
@torch.no_grad()
def block_influence(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 8,
                    progress: Callable = lambda it: it) -> list[LayerScores]:
    """BI_i = 1 − mean over tokens of cos(block input, block output); depth only, so every unit
    of block i carries BI_i."""
    inputs = capture_block_inputs(adapter, windows, batch_size=batch_size, execution_device=ctx.execution_device)
    scores = []
    for layer in progress(adapter.layers):
        with block_on(layer.layer, ctx.execution_device):
            outputs = run_block(layer.layer, inputs)
        total, count = 0.0, 0
        for x, y in zip(inputs.hidden, outputs):
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
        scores.append(_filled(1.0 - total / count, ctx, adapter))
        inputs = inputs.with_hidden(outputs)
    return scores


@register_score("bip", whole_model=True, standardized=True, source="LLM-BIP (block-output influence; our reading)")
@torch.no_grad()
def bip(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 8,
        progress: Callable = lambda it: it) -> list[LayerScores]:
    """Relative block-output deviation of removing each unit alone (see the module docstring)."""
    inputs = capture_block_inputs(adapter, windows, batch_size=batch_size, execution_device=ctx.execution_device)
    hd, g = ctx.head_dim, ctx.group_size
    scores = []
    for layer in progress(adapter.layers):
        o, down = layer.attention_output(), layer.mlp_output()
        acc = {"gram_o": 0.0, "sq_down": 0.0, "attn_out": [], "mlp_in_sq": 0.0, "mlp_out_sq": 0.0}

        def o_hook(_m, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            acc["gram_o"] = acc["gram_o"] + (x.T @ x).double()
            acc["attn_out"].append(out)

        def down_hook(_m, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc["sq_down"] = acc["sq_down"] + x.square().sum(0)
            acc["mlp_out_sq"] += float(out.double().square().sum())

        handles = [o.register_forward_hook(o_hook), down.register_forward_hook(down_hook)]
        try:
            with block_on(layer.layer, ctx.execution_device):
                outputs = run_block(layer.layer, inputs)
        finally:
            for h in handles:
                h.remove()
        out_norm = sum(float(y.double().square().sum()) for y in outputs) ** 0.5
        for x, attn in zip(inputs.hidden, acc["attn_out"]):  # residual stream entering the MLP branch
            acc["mlp_in_sq"] += float((x.double() + attn.double()).square().sum())
        gain = (acc["mlp_out_sq"] / max(acc["mlp_in_sq"], 1e-30)) ** 0.5
        device = acc["sq_down"].device  # the statistics stay where the block ran
        w_o, w_down = o.weight.detach().double().to(device), down.weight.detach().double().to(device)
        channels = w_down.norm(dim=0) * acc["sq_down"].sqrt() / out_norm

        def deviation(columns: torch.Tensor) -> float:
            w = w_o[:, columns]
            return float(torch.trace(w.T @ w @ acc["gram_o"][columns][:, columns]).clamp_min(0).sqrt())

        scale = (1.0 + gain) / out_norm
        heads = torch.tensor([deviation(torch.arange(h * hd, (h + 1) * hd)) for h in range(w_o.shape[1] // hd)])
        groups = torch.tensor([deviation(torch.arange(k * g * hd, (k + 1) * g * hd))
                               for k in range(w_o.shape[1] // (g * hd))])
        scores.append(LayerScores(heads.double() * scale, groups.double() * scale, channels))
        inputs = inputs.with_hidden(outputs)
    return scores
