"""Bias compensation (FLAP): the removed input columns' average contribution becomes a bias.

Locally (dense inputs) this is ``b = W[:, removed] · mean(X[:, removed])``. Written as the
difference of the dense output's mean and the pruned output's mean,

    b = W · mean(X_dense) − W_K · mean(X_seen,K),

the same formula also serves the sequential mode, where the kept columns see the pruned
upstream model's inputs instead of the dense ones, and a least squares with an intercept, where
``W_K`` is the refitted kept weights.
"""

from __future__ import annotations

import torch


def compensation_bias(
    weight: torch.Tensor, kept: int | torch.Tensor, dense_mean: torch.Tensor, seen_mean: torch.Tensor,
    kept_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bias (d_out,) that restores the dense output's mean; in float64 on the means' device.

    ``kept``: a prefix width or the kept column indices of ``weight``; ``dense_mean`` (d_in,);
    ``seen_mean`` (|K|,): the mean of the inputs the kept columns will see. ``kept_weight``: the
    kept columns' new weights (d_out x |K|; a least squares' intercept), else ``weight``'s own.
    """
    w = weight.detach().to(device=dense_mean.device, dtype=torch.float64)
    if kept_weight is not None:
        w_kept = kept_weight.detach().to(device=dense_mean.device, dtype=torch.float64)
    else:
        w_kept = w[:, :kept] if isinstance(kept, int) else w[:, kept.to(w.device)]
    return w @ dense_mean.to(torch.float64) - w_kept @ seen_mean.to(torch.float64)
