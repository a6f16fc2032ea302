"""Numerical Pruning's ``newton`` score: a relaxed keep-mask found by Newton iterations.

For an output projection W (d_out x d_in) with input second moments C = XᵀX, the relaxed mask
z ∈ [0, 1]^d_in minimises

    φ(z) = ½ Σ_i ‖X W_iᵀ − X (z ∘ W_i)ᵀ‖² + ½ λ (⟨1, z⟩ − r)²  =  ½ (1 − z)ᵀ A (1 − z) + ½ λ (⟨1, z⟩ − r)²

with A = (WᵀW) ∘ C and r the kept count at the target ratio. The Hessian H = A + λ·11ᵀ does not
depend on z, so it is factored once and every step ``z ← z − H⁻¹∇φ`` costs two triangular
solves; steps are projected onto the box and halved until φ decreases (so φ never increases).
λ = mean diag(A), which puts the budget term on the scale of the reconstruction term. A head's
score is the mean z over its o_proj columns; a channel's is its z. Scores lie in [0, 1] in every
layer, hence comparable across layers (``standardized``).
"""

from __future__ import annotations

import torch

from space.calibration import LayerStats, StatsRequest
from space.adapters import LayerAdapter
from space.errors import UserError
from space.scores.base import LayerScores, ScoreContext, register_score

ITERATIONS = 50


def objective(z: torch.Tensor, a: torch.Tensor, r: float, lam: float) -> float:
    u = 1 - z
    return float(0.5 * u @ a @ u + 0.5 * lam * (z.sum() - r) ** 2)


def newton_mask(a: torch.Tensor, r: float, *, lam: float | None = None, iterations: int = ITERATIONS,
                ) -> tuple[torch.Tensor, list[float]]:
    """The relaxed mask z and φ after each iteration (non-increasing), starting from z = 1."""
    a = a.double()
    d = a.shape[0]
    lam = float(a.diagonal().mean().clamp_min(1e-12)) if lam is None else lam
    ones = torch.ones(d, dtype=torch.float64, device=a.device)
    h = a + lam * torch.outer(ones, ones)
    h.diagonal().add_(1e-8 * float(h.diagonal().mean()))
    factor = torch.linalg.cholesky(h)
    z = ones.clone()
    history = [objective(z, a, r, lam)]
    for _ in range(iterations):
        grad = a @ (z - 1) + lam * (z.sum() - r) * ones
        step = torch.cholesky_solve(grad[:, None], factor)[:, 0]
        t, current = 1.0, history[-1]
        while t > 1e-6:
            candidate = (z - t * step).clamp(0, 1)
            value = objective(candidate, a, r, lam)
            if value <= current:
                z, current = candidate, value
                break
            t /= 2
        history.append(current)
    return z, history


def projection_mask(weight: torch.Tensor, gram: torch.Tensor, kept: float) -> torch.Tensor:
    w = weight.detach().double()
    return newton_mask((w.T @ w) * gram.to(w.device), kept)[0]


@register_score(
    "newton",
    request=StatsRequest(("o", "down"), gram=("o", "down")),
    standardized=True,
    uses_ratio=True,
    source="Numerical Pruning (relaxed-mask Newton iteration)",
)
def newton(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext) -> LayerScores:
    if ctx.ratio is None:
        raise UserError("the newton score needs the target ratio (its mask keeps that fraction of each projection)")
    o, down = layer.attention_output(), layer.mlp_output()
    z_o = projection_mask(o.weight, stats.inputs["o"].gram, ctx.ratio * o.in_features)
    z_down = projection_mask(down.weight, stats.inputs["down"].gram, ctx.ratio * down.in_features)
    heads = z_o.view(-1, ctx.head_dim).mean(1)
    groups = heads.view(-1, ctx.group_size).mean(1)
    return LayerScores(heads, groups, z_down)
