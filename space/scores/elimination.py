"""``obs-elimination``: a unit order that is good for the reformation we apply (ZipLM / OSSCAR / Týr).

The prefix of a layer's order is what a subnet keeps, and the kept output-projection columns are
then refitted by least squares. Ranking units by a one-shot score (magnitude, Wanda) ignores that
refit: two redundant channels both score high, though either one can stand in for the other. Here
each output projection W (d_out x d_in) is ordered by greedy backward elimination on the damped
second moment of its inputs, H = XᵀX + λI: the error of keeping the columns K, after the refit
Ŵ_K = W H[:, K] H[K, K]⁻¹, is

    E(K) = tr(W H Wᵀ) − tr(W H[:, K] H[K, K]⁻¹ H[K, :] Wᵀ),

and removing a set S of kept units (a channel: one column; a head: its head_dim columns) from the
current refitted weights W' and inverse G = H[K, K]⁻¹ raises it by (optimal brain surgeon)

    ΔE(S) = tr(W'_S (G_SS)⁻¹ W'_Sᵀ),  then  W' ← W' − W'_S (G_SS)⁻¹ G_S,:,  G ← G − G_:,S (G_SS)⁻¹ G_S,:.

Each step removes the ``step`` units of smallest ΔE alone, as one set (its exact ΔE is recorded).
A unit's score is the error E (relative to E of removing everything, tr(W H Wᵀ)) reached when it is
removed: it grows along the elimination, so sorting by score gives back the order (last removed
first), and it is comparable across layers. KV groups score the sum of their heads' scores; a
head's place inside its group follows its own score (whole-head pruning inside GQA groups keeps the
shapes valid; choosing heads jointly with the group shape is not done here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from space.adapters import LayerAdapter
from space.calibration import LayerStats, StatsRequest
from space.scores.base import LayerScores, ScoreContext, register_score, weight64

DAMPING = 1e-2  # λ = DAMPING · mean diag(XᵀX): the greedy order's ridge (ZipLM's setting)
CHANNELS_PER_STEP = 16


@dataclass
class Elimination:
    removed: list[list[int]]  # the units removed at each step, in order
    increase: list[float]  # ΔE of each step, predicted before it was taken
    error: list[float]  # E after each step
    total: float  # tr(W H Wᵀ): E with every unit removed


def damped(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    h = gram.double().clone()
    h.diagonal().add_(damping * float(h.diagonal().mean().clamp_min(1e-12)))
    return h


def eliminate(weight: torch.Tensor, h: torch.Tensor, *, unit: int = 1, step: int = 1) -> Elimination:
    """Greedy backward elimination of the units (``unit`` consecutive columns each) of ``weight``
    under the damped second moment ``h``, ``step`` units at a time."""
    w = weight.detach().double().to(h.device).clone()
    units = w.shape[1] // unit
    g = torch.cholesky_inverse(torch.linalg.cholesky(h))
    columns = torch.arange(w.shape[1], device=h.device).view(units, unit).clone()  # unit -> its columns now
    alive = list(range(units))
    total = float(torch.einsum("ij,jk,ik->", w, h, w))
    result = Elimination([], [], [], total)
    error = 0.0
    while alive:
        if len(alive) * unit <= 0.75 * w.shape[1]:
            # keep only the alive columns: each step's downdate then costs the alive size squared,
            # not the layer's (for one channel per step, about a third of the work overall)
            keep = columns[alive].reshape(-1)
            w, g = w[:, keep], g[keep][:, keep]
            columns[alive] = torch.arange(len(alive) * unit, device=h.device).view(len(alive), unit)
        costs = _costs(w, g, columns, alive)
        chosen = [alive[i] for i in torch.argsort(costs, stable=True)[:step].tolist()]
        s = columns[chosen].reshape(-1)
        block_inv = torch.linalg.inv(g[s][:, s])
        increase = float(torch.einsum("ij,jk,ik->", w[:, s], block_inv, w[:, s]))
        w -= w[:, s] @ block_inv @ g[s]
        g -= g[:, s] @ block_inv @ g[s]
        g[s] = 0
        g[:, s] = 0
        error += increase
        result.removed.append(chosen)
        result.increase.append(increase)
        result.error.append(error)
        gone = set(chosen)
        alive = [u for u in alive if u not in gone]
    return result


def _costs(w: torch.Tensor, g: torch.Tensor, columns: torch.Tensor, alive: list[int]) -> torch.Tensor:
    """ΔE of removing each alive unit alone."""
    if columns.shape[1] == 1:
        index = columns[alive, 0]
        return w[:, index].square().sum(0) / g.diagonal()[index]
    return torch.stack([torch.einsum("ij,jk,ik->", w[:, columns[u]], torch.linalg.inv(g[columns[u]][:, columns[u]]),
                                     w[:, columns[u]]) for u in alive])


def unit_scores(result: Elimination, units: int) -> torch.Tensor:
    """Per unit, the relative error reached when it was removed (later removed: higher)."""
    scores = torch.empty(units, dtype=torch.float64)
    for chosen, error in zip(result.removed, result.error):
        scores[chosen] = error / max(result.total, 1e-30)
    return scores


@dataclass
class Swaps:
    kept: torch.Tensor  # the kept units after the local search (sorted)
    error: float  # E(kept) after it
    before: float  # E of the kept set it started from
    accepted: int  # swaps taken


SWAP_ROUNDS = 64  # the swap search takes at most this many swaps per layer
REFRESH_SWAPS = 32  # its rank-one updates are recomputed from H after this many swaps


def swap_search(weight: torch.Tensor, h: torch.Tensor, kept: torch.Tensor, *, rounds: int = SWAP_ROUNDS,
                candidates: int = 4) -> Swaps:
    """OSSCAR's local search on single columns: from the kept set ``kept``, swap a kept column out
    and an omitted one in whenever that lowers the refit error E, until no improving swap is found
    among the ``candidates`` cheapest removals, or after ``rounds`` swaps.

    With B = W H, the refit of K is Ŵ_K = B_K H_KK⁻¹ and removing i costs ‖Ŵ[:, i]‖² / G_ii
    (G = H_KK⁻¹, the OBS cost); adding j to K' = K − {i} lowers E by ‖B_j − Ŵ_K' H_K'j‖² / s_j with
    the Schur complement s_j = H_jj − H_jK' G' H_K'j. A swap is taken when the best addition gains
    more than the removal costs. Every quantity is kept for all columns at once (:class:`KeptFit`)
    and a swap updates them in rank-one steps, so a round costs O((d_out + k) · d_in), not a k x k
    factorisation."""
    w = weight.detach().double().to(h.device)
    b = w @ h
    total = float(torch.einsum("ij,jk,ik->", w, h, w))
    kept = kept.to(h.device).clone()
    before = refit_error(b, h, torch.sort(kept).values, total)
    fit = KeptFit(b, h, kept)
    accepted = 0
    for _ in range(rounds):
        costs = fit.fitted.square().sum(0) / fit.g.diagonal()
        residual_norms = fit.residual.square().sum(0)
        for i in torch.argsort(costs)[:candidates].tolist():
            gains = fit.gains_without(i, residual_norms)
            best = int(torch.argmax(gains))
            if float(gains[best]) > float(costs[i]) * (1 + 1e-9) + 1e-12 * total:
                fit.swap(i, best)
                accepted += 1
                if accepted % REFRESH_SWAPS == 0:
                    fit = KeptFit(b, h, fit.kept)
                break
        else:
            break
    kept = torch.sort(fit.kept).values
    return Swaps(kept.cpu(), refit_error(b, h, kept, total) if accepted else before, before, accepted)


class KeptFit:
    """The least-squares refit of B = W H on the kept columns K (any order), for every column l:
    G = H_KK⁻¹; P = G H_K: (the kept columns' coefficients of each column); the refitted weights
    F = B_K G; the residual Q = B − F H_K: (zero on K); and the Schur complement
    S_l = H_ll − H_lK G H_Kl (the part of column l that K does not explain; zero on K)."""

    def __init__(self, b: torch.Tensor, h: torch.Tensor, kept: torch.Tensor):
        self.h, self.kept = h, kept
        rows = h[kept]  # H_K:, gathered once
        self.g = torch.cholesky_inverse(torch.linalg.cholesky(rows[:, kept]))
        self.p = self.g @ rows
        self.fitted = b[:, kept] @ self.g
        self.residual = b - self.fitted @ rows
        self.schur = h.diagonal() - (rows * self.p).sum(0)
        self.inside = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        self.inside[kept] = True

    def gains_without(self, i: int, residual_norms: torch.Tensor) -> torch.Tensor:
        """For every column j, the error drop of adding j once position i is removed (−inf on K):
        with K − {i}, Q_j gains f p_j / g_ii and S_j gains p_j² / g_ii (f = F[:, i], p = P[i])."""
        gii, f, p = self.g[i, i], self.fitted[:, i], self.p[i]
        numerator = residual_norms + 2 * p * (f @ self.residual) / gii + p.square() * (f @ f) / gii ** 2
        gains = numerator / (self.schur + p.square() / gii).clamp_min(1e-30)
        return gains.masked_fill(self.inside, float("-inf"))

    def swap(self, i: int, j: int) -> None:
        """Column j takes position i of K: remove i (an OBS downdate), then add j (a bordering)."""
        g, h = self.g, self.h
        gi, gii, f, p = g[:, i].clone(), g[i, i].clone(), self.fitted[:, i].clone(), self.p[i].clone()
        g -= torch.outer(gi, gi) / gii  # row and column i are now zero
        self.p -= torch.outer(gi, p) / gii
        self.fitted -= torch.outer(f, gi) / gii
        self.residual += torch.outer(f, p) / gii
        self.schur += p.square() / gii
        self.inside[self.kept[i]] = False
        rows = h[self.kept]  # H_K: (row i is the leaving column's: u_i = 0 below, so it adds nothing)
        u = g @ rows[:, j]  # u_i = 0
        s = self.schur[j].clamp_min(1e-30)
        v = u @ rows - h[j]  # −(H_j: − H_jK' G' H_K':), the new column's unexplained part
        r = self.residual[:, j].clone()
        g += torch.outer(u, u) / s
        g[i], g[:, i], g[i, i] = -u / s, -u / s, 1 / s
        self.p += torch.outer(u, v) / s
        self.p[i] = -v / s
        self.fitted -= torch.outer(r, u) / s
        self.fitted[:, i] = r / s
        self.residual += torch.outer(r, v) / s
        self.schur -= v.square() / s
        self.kept[i] = j
        self.inside[j] = True


def refit_error(b: torch.Tensor, h: torch.Tensor, kept: torch.Tensor, total: float) -> float:
    """E(K) = tr(W H Wᵀ) − tr(B_K H_KK⁻¹ B_Kᵀ)."""
    bk = b[:, kept]
    return total - float((bk * torch.linalg.solve(h[kept][:, kept], bk.T).T).sum())


def elimination_scores(layer: LayerAdapter, stats: LayerStats, ctx: ScoreContext, *, channel_step: int) -> LayerScores:
    """Per-layer scores from the greedy elimination of o_proj's heads and down_proj's channels."""
    o, down = layer.attention_output(), layer.mlp_output()
    heads = eliminate(weight64(o), damped(stats.inputs["o"].gram), unit=ctx.head_dim)
    channels = eliminate(weight64(down), damped(stats.inputs["down"].gram), step=channel_step)
    head_scores = unit_scores(heads, o.in_features // ctx.head_dim)
    return LayerScores(head_scores, head_scores.view(-1, ctx.group_size).sum(1),
                       unit_scores(channels, down.in_features))


# The greedy order (Týr's 16 channels per step) and ZipLM's (one unit per step): one function, two steps.
for _name, _step, _source in (
    ("obs-elimination", CHANNELS_PER_STEP, "greedy OBS elimination under least-squares refit (ZipLM / OSSCAR / Týr-style)"),
    ("ziplm", 1, "ZipLM's structured OBS: the same greedy elimination, one head or one channel per step"),
):
    register_score(_name, request=StatsRequest(("o", "down"), gram=("o", "down")), standardized=True,
                   source=_source)(functools.partial(elimination_scores, channel_step=_step))
