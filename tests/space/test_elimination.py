"""The greedy OBS elimination order and OSSCAR's swap search (space/scores/elimination.py)."""

import itertools

import pytest
import torch

from space.adapters import adapter_for
from space.scores import compute_scores
from space.scores.elimination import KeptFit, damped, eliminate, swap_search, unit_scores


def refit_error(w: torch.Tensor, h: torch.Tensor, kept: torch.Tensor) -> float:
    """E(K) by a direct least-squares refit: tr(W H Wᵀ) − tr(W H[:, K] H[K, K]⁻¹ H[K, :] Wᵀ)."""
    total = float(torch.einsum("ij,jk,ik->", w, h, w))
    if kept.numel() == 0:
        return total
    a = w @ h[:, kept]
    return total - float(torch.einsum("ij,jk,ik->", a, torch.linalg.inv(h[kept][:, kept]), a))


def problem(d_out=12, d_in=24, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                                    dtype=torch.float64)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), damped(x.T @ x)


@pytest.mark.parametrize("unit,step", [(1, 1), (1, 3), (4, 1)])
def test_each_predicted_increase_is_the_refit_s_actual_increase(unit, step):
    w, h = problem()
    result = eliminate(w, h, unit=unit, step=step)
    units = w.shape[1] // unit
    removed: list[int] = []
    before = 0.0
    for chosen, increase, error in zip(result.removed, result.increase, result.error):
        removed += chosen
        kept = torch.tensor([c for u in range(units) if u not in removed for c in range(u * unit, (u + 1) * unit)],
                            dtype=torch.long)
        actual = refit_error(w, h, kept)
        assert increase == pytest.approx(actual - before, rel=1e-6, abs=1e-9 * result.total)
        assert error == pytest.approx(actual, rel=1e-6)
        before = actual
    assert sorted(removed) == list(range(units)) and result.error[-1] == pytest.approx(result.total, rel=1e-6)
    scores = unit_scores(result, units)
    last_removed_first = torch.argsort(scores, descending=True, stable=True).tolist()
    assert last_removed_first[:len(result.removed[-1])] == sorted(result.removed[-1])


def test_elimination_prefixes_beat_a_magnitude_order_on_redundant_channels():
    """Two copies of each strong input: magnitude keeps both copies, the elimination keeps one
    copy of each and lets the refit carry the other."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(400, 4, generator=g, dtype=torch.float64)
    x = torch.cat([base, base + 1e-3 * torch.randn(400, 4, generator=g, dtype=torch.float64),
                   0.3 * torch.randn(400, 4, generator=g, dtype=torch.float64)], dim=1)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    w[:, :8] *= 3
    h = damped(x.T @ x, 1e-6)
    order = torch.argsort(unit_scores(eliminate(w, h), 12), descending=True, stable=True)
    magnitude = torch.argsort(w.norm(dim=0) * x.norm(dim=0), descending=True, stable=True)
    ours = [refit_error(w, h, order[:k]) for k in range(1, 12)]
    theirs = [refit_error(w, h, magnitude[:k]) for k in range(1, 12)]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(ours, theirs))
    assert ours[5] < 0.5 * theirs[5]  # 6 kept: one of each pair + two others, vs both copies of three


def test_the_score_orders_every_layer_of_a_model(make_model, token_ids):
    adapter = adapter_for(make_model("llama"))
    scores = compute_scores(adapter, token_ids, ["obs-elimination"])["obs-elimination"]
    for s in scores:
        assert s.heads.shape == (6,) and s.groups.shape == (2,) and s.channels.shape == (96,)
        assert 0 < float(s.channels.min()) and float(s.channels.max()) == pytest.approx(1.0)


def test_swap_search_reaches_the_optimum_where_greedy_misses_it():
    """A layer of 10 columns keeping 4: the greedy elimination's set is worse than the best of
    the 210 subsets; one swap (OSSCAR's local search) reaches the best."""
    w, h = problem(d_out=4, d_in=10, tokens=30, seed=2)
    greedy = torch.argsort(unit_scores(eliminate(w, h), 10), descending=True, stable=True)[:4]
    best = min(itertools.combinations(range(10), 4), key=lambda c: refit_error(w, h, torch.tensor(c)))
    optimum = refit_error(w, h, torch.tensor(best))
    assert refit_error(w, h, greedy) > optimum * 1.1
    swaps = swap_search(w, h, greedy)
    assert swaps.accepted >= 1 and sorted(swaps.kept.tolist()) == list(best)
    assert swaps.error == pytest.approx(optimum, rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_swaps_only_lower_the_refit_error_and_report_it(seed):
    w, h = problem(d_out=6, d_in=16, tokens=40, seed=seed)
    greedy = torch.argsort(unit_scores(eliminate(w, h), 16), descending=True, stable=True)[:6]
    swaps = swap_search(w, h, greedy, candidates=6, rounds=1000)
    assert len(set(swaps.kept.tolist())) == 6
    assert swaps.before == pytest.approx(refit_error(w, h, greedy), rel=1e-9)
    assert swaps.error == pytest.approx(refit_error(w, h, swaps.kept), rel=1e-9)
    assert swaps.error <= swaps.before * (1 + 1e-12)
    # a local optimum: with every removal tried (candidates = kept) no single swap improves on it
    final = swap_search(w, h, swaps.kept, candidates=6)
    assert final.accepted == 0


def brute_force_swaps(w, h, kept, *, candidates, rounds):
    """The swap search by direct refits: each round, the ``candidates`` removals of least error
    increase, each with its best addition, the first one that lowers E taken."""
    kept = sorted(kept.tolist())
    for _ in range(rounds):
        error = refit_error(w, h, torch.tensor(kept))
        without = {i: refit_error(w, h, torch.tensor([k for k in kept if k != i])) for i in kept}
        for i in sorted(kept, key=lambda c: without[c] - error)[:candidates]:
            rest = [k for k in kept if k != i]
            j = min((c for c in range(w.shape[1]) if c not in kept),
                    key=lambda c: refit_error(w, h, torch.tensor(rest + [c])))
            if refit_error(w, h, torch.tensor(rest + [j])) < error * (1 - 1e-9):
                kept = sorted(rest + [j])
                break
        else:
            break
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_swap_search_takes_the_swaps_of_direct_refits(seed):
    w, h = problem(d_out=5, d_in=14, tokens=30, seed=seed)
    start = torch.randperm(14, generator=torch.Generator().manual_seed(seed))[:6]  # a poor start: many swaps
    swaps = swap_search(w, h, start, candidates=3, rounds=40)
    assert swaps.accepted >= 2
    assert sorted(swaps.kept.tolist()) == brute_force_swaps(w, h, start, candidates=3, rounds=40)


def test_the_rank_updated_fit_equals_a_fresh_one_after_many_swaps():
    w, h = problem(d_out=7, d_in=30, tokens=60, seed=3)
    b = w @ h
    fit = KeptFit(b, h, torch.arange(12))
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # random swaps: far more than a search's refresh interval
        i = int(torch.randint(12, (1,), generator=g))
        outside = torch.nonzero(~fit.inside).reshape(-1)
        fit.swap(i, int(outside[torch.randint(len(outside), (1,), generator=g)]))
    fresh = KeptFit(b, h, fit.kept.clone())
    scale = float(h.abs().max())
    for name in ("g", "p", "fitted", "residual", "schur"):
        assert torch.allclose(getattr(fit, name), getattr(fresh, name), rtol=1e-7, atol=1e-8 * scale), name
