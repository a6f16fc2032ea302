"""ADMM rectification (the Search-LLM paper's solver), for comparison with the closed form and
for masks that are not whole columns.

It solves the problem of :mod:`reform.lstsq` with the removed entries forced to zero,

    min ½‖W X − Ŵ X‖² + ½λ‖Ŵ‖²   subject to  Ŵ = Ŵ ⊙ keep_mask,

by alternating (start Ŵ = Z = W, U = 0):

    Ŵ ← (C + λI + ρI)⁻¹ (C Wᵀ + ρ (Z − U)ᵀ)      one Cholesky factor, reused every iteration
    Z ← (Ŵ + U) ⊙ keep_mask                       projection onto the KEPT entries (the paper's
    U ← U + Ŵ − Z                                 eq. 8 names the wrong mask)

With the same λ its fixed point is the closed-form solution, so for whole columns it can only
approach :class:`~reform.lstsq.PrefixLstsq`. ρ is relative to mean(diag C), like λ: the paper's
ρ = 1 then means the same thing whatever the token count or activation scale.
"""

from __future__ import annotations

import logging

import torch

from reform.lstsq import DEFAULT_DAMPING, damping_value

log = logging.getLogger(__name__)

DEFAULT_RHO = 1.0
DEFAULT_ITERATIONS = 30


def admm(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep_mask: torch.Tensor,
    *,
    rho: float = DEFAULT_RHO,
    iterations: int = DEFAULT_ITERATIONS,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """The rectified weight, full shape (d_out x d_in) with zeros where ``keep_mask`` is False.

    ``keep_mask``: bool, (d_in,) for whole kept columns or (d_out, d_in) for any pattern.
    Computed in float64 on ``gram``'s device; returned in the weight's dtype and device.
    """
    if rho <= 0 or iterations < 1:
        raise ValueError(f"ADMM needs rho > 0 and iterations >= 1, got {rho} and {iterations}")
    device = gram.device
    c = gram.to(torch.float64)
    w = weight.detach().to(device=device, dtype=torch.float64)
    mask = keep_mask.to(device=device, dtype=torch.float64)
    lam = damping_value(c, damping)
    r = rho * float(c.diagonal().mean())
    factor = torch.linalg.cholesky(c + (lam + r) * torch.eye(c.shape[0], dtype=torch.float64, device=device))
    target = c @ w.T  # C Wᵀ: (d_in, d_out)
    estimate, z, u = w, w.clone(), torch.zeros_like(w)
    for _ in range(iterations):
        estimate = torch.cholesky_solve(target + r * (z - u).T, factor).T
        z = (estimate + u) * mask
        u = u + estimate - z
    log.debug("ADMM: relative primal residual %.3g after %d iterations",
              float((estimate - z).norm() / z.norm().clamp_min(1e-30)), iterations)
    return z.to(dtype=weight.dtype, device=weight.device)
