"""Closed-form least-squares rectification of an output projection (METHODS.md section 4).

For an output projection ``W`` (d_out x d_in) whose input columns ``K`` are kept, the weights
that best re-express the dense output from the kept inputs are

    Ŵ_K = argmin ‖W X − Ŵ_K X_K‖² + λ‖Ŵ_K‖² = W · C[:, K] · (C[K, K] + λI)⁻¹,   C = XᵀX,

so the omitted columns still contribute, through the target ``W X``. λ = damping · mean(diag C).
With ``ridge="dense"`` the ridge pulls toward the dense model's kept weights instead of zero,
``+ λ‖Ŵ_K − W_K‖²``, so ``Ŵ_K = (W C[:, K] + λ W_K)(C[K, K] + λI)⁻¹``: in ``B`` below ``C`` becomes
``C + λI``, and λ then sets how far the tokens may move the weights away from the dense ones (the
limit λ → ∞ is no compensation), not how far toward zero.

Units are in importance order (space/order.py), so ``K`` is usually a prefix of the columns.
Then one Cholesky factor ``L Lᵀ = C + λI`` serves every width: ``L[:k, :k]`` factors the leading
k-block, and a width costs two triangular solves against ``B = C Wᵀ`` (:class:`PrefixLstsq`).
This is what keeps least squares affordable inside a search fitness. A kept set that is not a
prefix (o_proj when fewer query heads per group are kept than the model has) is solved directly;
its block of ``C + λI`` is recovered from the factor as ``L[K] L[K]ᵀ``, so no copy of ``C`` is kept.

The sequential mode (reform/rectify.py) fits ``Ŵ_K`` to the dense output from the inputs of the
already pruned upstream model; it passes the pruned inputs' second moment as ``gram`` (k x k) and
the cross moment ``X_prunedᵀ X_dense`` as ``cross`` (k x d_in): ``Ŵ_Kᵀ = (gram + λI)⁻¹ cross Wᵀ``.
The residual mode adds the residual stream's drift ``D`` (dense minus pruned stream where the
sub-layer's output is added) to that target: ``drift = X_prunedᵀ D`` (k x d_out) joins the
right-hand side, ``Ŵ_Kᵀ = (gram + λI)⁻¹ (cross Wᵀ + drift)``.

The factor and ``B`` are formed where the statistics live (CPU or CUDA), in float64; what a search
keeps afterwards, and where, is :meth:`PrefixLstsq.precompute`'s choice.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DEFAULT_DAMPING = 1e-4
# What the ridge pulls the solved weights toward: zero (classic ridge) or the dense kept weights.
RIDGES = ("zero", "dense")


def damping_value(gram: torch.Tensor, damping: float) -> float:
    """The absolute ridge λ = ``damping`` · mean(diag C) (relative, so it ignores token count and scale)."""
    return damping * float(gram.diagonal().mean())


class PrefixLstsq:
    """Least-squares rectification of one output projection for any kept column set.

    ``weight``: the dense W (d_out x d_in) in importance order. ``gram``: the second moment of
    the inputs the rectified layer will see (m x m). ``cross``: ``X_seenᵀ X_dense`` (m x d_in)
    when those inputs differ from the dense ones (sequential mode); None means they are the
    dense inputs (``cross = gram``, m = d_in). ``drift``: ``X_seenᵀ D`` (m x d_out), the residual
    stream's drift the fit also targets (residual mode). ``ridge``: what the ridge pulls toward
    (module docstring; ``"dense"`` only in the local form). Build once per layer, then :meth:`solve`
    any width.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        gram: torch.Tensor,
        *,
        cross: torch.Tensor | None = None,
        drift: torch.Tensor | None = None,
        damping: float = DEFAULT_DAMPING,
        ridge: str = "zero",
    ):
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if ridge not in RIDGES:
            raise ValueError(f"unknown ridge {ridge!r}; known: {', '.join(RIDGES)}")
        self.weight = weight
        if drift is not None and cross is None:
            raise ValueError("a drift target needs the sequential form (cross)")
        if ridge == "dense" and cross is not None:
            raise ValueError("a ridge toward the dense weights needs the local form (the kept columns of W)")
        self.local = cross is None
        self.ridge = ridge
        device = gram.device
        w = weight.detach().to(device=device, dtype=torch.float64)
        self.lam = damping_value(gram, damping)
        regularised = gram.to(torch.float64) + self.lam * torch.eye(gram.shape[0], dtype=torch.float64, device=device)
        if ridge == "dense":  # (C + λI) Wᵀ: the pull toward W_K joins the right-hand side
            moment = regularised
        else:
            moment = gram if cross is None else cross
        self.rhs = moment.to(torch.float64) @ w.T  # B: (m, d_out)
        if drift is not None:
            self.rhs += drift.to(device=device, dtype=torch.float64)
        self._width = self.rhs.shape[0]
        factor, info = torch.linalg.cholesky_ex(regularised)
        if int(info) == 0:
            self.factor: torch.Tensor | None = factor
            self.regularised: torch.Tensor | None = None
        else:
            log.warning(
                "C + λI (%d x %d, λ = %.3g) is not positive definite (Cholesky failed at %d): solving "
                "each kept set with a clamped eigendecomposition instead", *gram.shape, self.lam, int(info),
            )
            self.factor, self.regularised = None, regularised

        self._inverse: torch.Tensor | None = None
        self._projected: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self._width

    def precompute(self, dtype: torch.dtype = torch.float32, *, prefix_only: bool = False,
                   device: torch.device | str | None = None) -> "PrefixLstsq":
        """Make every prefix solve one matrix product, for solving thousands of widths.

        ``L⁻¹`` is lower triangular, so its leading k-block is the inverse of ``L[:k, :k]`` and the
        first k rows of ``P = L⁻¹ B`` only involve ``B[:k]``: then ``Ŵ_Kᵀ = (L⁻¹[:k, :k])ᵀ P[:k]``.
        ``L⁻¹`` and ``P`` are formed once in float64 and kept in ``dtype`` (float32 keeps about
        five significant digits here: plenty to rank candidates, and 10-50x faster on a CPU than
        two triangular solves per width). The float64 factor and ``B`` are not kept: they stay in
        float32 (or ``dtype`` if wider), for the kept sets that are not prefixes (upcast per solve):
        their block ``L[K] L[K]ᵀ`` is solved again, and in bfloat16 its error is that of the ridge
        itself (experiments/results/solver_precision.md: fitness 7x off), while ``L⁻¹`` and ``P`` in
        bfloat16 move the fitness by tenths of a percent.

        ``prefix_only``: keep neither (half of the state): only prefix widths can be solved then,
        which is all down_proj ever needs, its channels being in importance order.
        ``device``: where the state lives (default: where the statistics are). A state on the CPU
        beside a model on a GPU is pinned, and each solve copies the rows it needs to the model's
        device and computes there (one layer's rows at a time, so a model whose solvers do not fit
        its GPU still searches with least squares inside the fitness)."""
        if self.factor is not None:
            eye = torch.eye(self.width, dtype=torch.float64, device=self.factor.device)
            inverse = torch.linalg.solve_triangular(self.factor, eye, upper=False)
            self._projected = _stored(inverse @ self.rhs, dtype, device)
            self._inverse = _stored(inverse, dtype, device)
            del inverse
            if prefix_only:
                self.factor = self.rhs = None
            else:
                exact = torch.promote_types(dtype, torch.float32)
                self.factor, self.rhs = _stored(self.factor, exact, device), _stored(self.rhs, exact, device)
        return self

    def state_bytes(self) -> int:
        """Bytes of the tensors this solver keeps."""
        return sum(t.numel() * t.element_size() for t in (self.factor, self.rhs, self.regularised, self._inverse,
                                                           self._projected) if t is not None)

    def _rows(self, tensor: torch.Tensor, rows) -> torch.Tensor:
        """``tensor[rows]`` where this solver computes: the weight's device (copied from pinned host
        memory when the state lives on the CPU)."""
        return tensor[rows].to(self.weight.device, non_blocking=True)

    def solve(self, kept: int | torch.Tensor) -> torch.Tensor:
        """Ŵ_K (d_out x |K|) in the weight's dtype and device. ``kept``: a prefix width, or the
        indices of the kept rows of ``gram`` (kept columns of W in local mode)."""
        if isinstance(kept, int):
            if not 0 < kept <= self.width:
                raise ValueError(f"kept width {kept} outside (0, {self.width}]")
            if self.local and kept == self.width:
                return self.weight  # nothing removed: the dense weight is already optimal
            if self._inverse is not None:  # rows first: a contiguous copy when the state is on the host
                inverse = self._rows(self._inverse, slice(0, kept))[:, :kept]
                solution = inverse.T @ self._rows(self._projected, slice(0, kept))
                return solution.T.to(dtype=self.weight.dtype).contiguous()
            rhs = self.rhs[:kept]
            if self.factor is not None:
                solution = torch.cholesky_solve(rhs, self.factor[:kept, :kept])
            else:
                solution = _eigh_solve(self.regularised[:kept, :kept], rhs, self.lam)
        else:
            self._check_full()
            index = kept.to(self.rhs.device)
            solution = _spd_solve(self._block(index), self._rows(self.rhs, index).double(), self.lam)
        return solution.T.to(dtype=self.weight.dtype, device=self.weight.device).contiguous()

    def explained(self, kept: int | torch.Tensor) -> float:
        """How much of the dense output the kept set re-expresses: ``tr(B_Kᵀ (C_KK + λI)⁻¹ B_K)``.

        The least-squares residual is ``tr(W C Wᵀ) − explained(K)`` (ridge term included), so the
        difference of two kept sets' values is exactly how much more error the smaller one leaves
        after its refit: comparable across layers, unlike importance scores. For a prefix it is
        ``‖P[:k]‖²`` (free after :meth:`precompute`). Not for a ridge toward the dense weights, whose
        residual also holds ``λ‖W_K‖²``."""
        if self.ridge != "zero":
            raise ValueError("explained() is the zero ridge's residual; this solver's ridge pulls toward the dense weights")
        if isinstance(kept, int) and (kept == 0 or self._projected is not None):
            return 0.0 if kept == 0 else float(self._projected[:kept].double().pow(2).sum())
        self._check_full()
        index = (torch.arange(kept) if isinstance(kept, int) else kept).to(self.rhs.device)
        rhs = self._rows(self.rhs, index).double()
        return float((_spd_solve(self._block(index), rhs, self.lam) * rhs).sum())

    def _check_full(self) -> None:
        if self.rhs is None:
            raise RuntimeError("this solver was made prefix-only (precompute(prefix_only=True)): "
                               "it solves prefix widths only")

    def _block(self, index: torch.Tensor) -> torch.Tensor:
        """(C + λI)[K, K], recovered from the factor when there is one."""
        if self.factor is not None:
            rows = self._rows(self.factor, index).double()
            return rows @ rows.T
        return self._rows(self.regularised, index)[:, index.to(self.weight.device)]


def _stored(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """``tensor`` as a solver keeps it: in ``dtype`` on ``device``, pinned when that is the host of a GPU."""
    stored = tensor.to(dtype=dtype, device=device if device is not None else tensor.device)
    if stored.device.type == "cpu" and torch.cuda.is_available():
        stored = stored.pin_memory()
    return stored


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """``matrix⁻¹ rhs`` by Cholesky, or by :func:`_eigh_solve` (logged) when Cholesky fails."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    log.warning("a %d x %d block of C + λI is not positive definite: clamped eigendecomposition", *matrix.shape)
    return _eigh_solve(matrix, rhs, lam)


def _eigh_solve(matrix: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """``matrix⁻¹ rhs`` with eigenvalues clamped from below, for matrices Cholesky rejected."""
    values, vectors = torch.linalg.eigh(matrix)
    floor = max(lam, float(values.abs().max()) * 1e-10, torch.finfo(matrix.dtype).tiny)
    return vectors @ ((vectors.T @ rhs) / values.clamp_min(floor)[:, None])
