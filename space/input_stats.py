"""Running statistics of a linear's inputs over calibration tokens (:class:`InputStats`): the second
moment the least squares and the refit-error orders solve on, the sums the one-shot scores read."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def bfloat16_products(exact: bool):
    """float32 matmuls on oneDNN's bfloat16 path (float32 accumulation and output) where ``exact``:
    the inputs hold bfloat16 values (a pass in bfloat16), so rounding them to bfloat16 loses nothing,
    and a CPU with bfloat16 units (AMX, AVX-512 BF16) multiplies at its bfloat16 rate. Products
    rounded to bfloat16 are not enough: summed over 64 windows of SmolLM2, an o_proj gram was not
    positive definite even with the order's ridge (2026-12-08)."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    if exact:
        matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class InputStats:
    """Running statistics of the inputs of one linear over calibration tokens, in float64:
    count, per-channel sum and sum of squares, and optionally ``C = XᵀX``.

    Each batch is summed in float32 (float64 inputs: float64) after subtracting a shift near the mean
    (the first batch's), and batches are added in float64: the sums of squares of large activations
    would lose the variance in float32, and a float64 copy of every batch took a fifth of the time of
    a down_proj's statistics with the gram (SmolLM2, 4096 tokens a batch)."""

    def __init__(self, width: int, *, gram: bool, device: torch.device):
        self.count = 0
        self.shift = torch.zeros(width, dtype=torch.float32, device=device)
        self.shifted_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.shifted_sumsq = torch.zeros(width, dtype=torch.float64, device=device)
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        x32 = x.float()
        if self.count == 0 and len(x):
            self.shift = x.double().mean(0).float()
        self.count += x.shape[0]
        shifted = (x if x.dtype == torch.float64 else x32) - self.shift
        self.shifted_sum += shifted.sum(0).double()
        self.shifted_sumsq += shifted.square().sum(0).double()
        if self.gram is not None:
            # One float32 product per batch (the costly part), accumulated in float64.
            with bfloat16_products(x.dtype == torch.bfloat16):
                self.gram += (x32.T @ x32).double()

    def reorder(self, columns: torch.Tensor) -> None:
        """Put the input columns in the order ``columns`` (a permutation: the linear's inputs were
        reordered the same way)."""
        columns = columns.to(self.shift.device)
        self.shift, self.shifted_sum, self.shifted_sumsq = (
            self.shift[columns], self.shifted_sum[columns], self.shifted_sumsq[columns])
        if self.gram is not None:
            self.gram = self.gram[columns][:, columns]

    @property
    def sum(self) -> torch.Tensor:
        return self.shifted_sum + self.count * self.shift.double()

    @property
    def sumsq(self) -> torch.Tensor:
        shift = self.shift.double()
        return self.shifted_sumsq + 2 * shift * self.shifted_sum + self.count * shift.square()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def centred_gram(self) -> torch.Tensor:
        """``Σ (x − μ)(x − μ)ᵀ = C − n μμᵀ``: the second moment a least squares with an intercept
        fits on (the intercept absorbs the mean)."""
        mean = self.mean
        return self.gram - self.count * torch.outer(mean, mean)

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance over tokens (population form, as FLAP's running estimate), from the
        shifted sums (no cancellation of the mean)."""
        shifted_mean = self.shifted_sum / self.count
        return (self.shifted_sumsq / self.count - shifted_mean.square()).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """Per-channel L2 norm over tokens, ‖X[:, j]‖₂."""
        return self.sumsq.sqrt()
