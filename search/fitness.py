"""The search fitness: how far a candidate, after least-squares rectification, is from good text
prediction on fixed calibration windows: its perplexity (``ppl``), or the KL divergence of its
next-token distributions from the dense model's (``kl``, :mod:`evaluators.divergence`; the dense
distributions are computed once, kept at their top-K tokens).

The paper scores candidates before reformation and reforms only the winner; allocations tuned that
way do not carry over (METHODS.md section 5), so here every candidate is scored with its o_proj
and down_proj rectified. It stays cheap because units are importance prefixes: one factor of
``C + λI`` per layer and projection serves every width (:class:`reform.lstsq.PrefixLstsq`), and a
layer's rectified weights are cached by its widths, so the children of a generation, which share
most layers with their parents, are mostly solved already.

Candidates are evaluated through prefix views of the permuted model (no weight copies), batch by
batch, so a caller can report intermediate values and stop a hopeless candidate early.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from evaluators.divergence import iter_kl, reference
from evaluators.perplexity import iter_nll
from reform.local import solver_overrides
from space.adapters import ModelAdapter
from space.views import subnet_view
from space.subnet import LayerWidths, Subnet


NAMES = {"ppl": "calibration perplexity", "kl": "calibration KL to the dense model"}  # what each kind measures
KINDS = tuple(NAMES)


@dataclass
class FitnessResult:
    value: float  # perplexity, or mean KL per position (lower is better either way)
    batch_values: list[float]  # the running value after each batch
    pruned: bool = False  # stopped early by the caller's callback


class _LayerCache:
    """Rectified weights per (layer, widths), least recently used dropped first, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple[int, LayerWidths], dict[str, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key, value: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in value.values())
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old.values())


class Fitness:
    """Scores subnets of one permuted model on fixed calibration windows.

    Args:
        adapter: the permuted model, in the dtype candidates are scored in.
        windows: calibration windows (never a test split), fixed for the whole search.
        solvers: per layer ``{"o": PrefixLstsq, "down": PrefixLstsq}`` from
            :func:`reform.local.output_solvers`; None scores candidates without rectification.
        batch_size: windows per forward pass (one intermediate value each).
        cache_bytes: memory for cached rectified layers.
        kind: ``ppl`` or ``kl`` (to the dense model, computed here once, on the dense model).
        top_k: tokens of the dense distribution kept per position for ``kl``.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        windows: torch.Tensor,
        *,
        solvers: list[dict] | None = None,
        batch_size: int = 8,
        cache_bytes: int = 1 << 30,
        kind: str = "ppl",
        top_k: int = 256,
    ):
        if kind not in KINDS:
            raise ValueError(f"fitness kind must be one of {KINDS}, got {kind!r}")
        self.adapter = adapter
        self.windows = windows
        self.solvers = solvers
        self.batch_size = batch_size
        self.dtype = next(adapter.model.parameters()).dtype
        self.cache = _LayerCache(cache_bytes)
        self.kind = kind
        # the dense model's distributions: the model is permuted, which does not change them
        self.reference = reference(adapter.model, windows, top_k=top_k, batch_size=batch_size) if kind == "kl" else None

    def overrides(self, subnet: Subnet) -> dict[str, torch.Tensor]:
        """Rectified o_proj/down_proj weights of every pruned layer (cached per layer)."""
        if self.solvers is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        dense = self.adapter.dims.dense_layer()
        for layer, widths in zip(self.adapter.layers, subnet.layers):
            if widths == dense:
                continue
            key = (layer.index, widths)
            entry = self.cache.get(key)
            if entry is None:
                single = Subnet(subnet.dims, [widths if i == layer.index else dense for i in range(len(subnet.layers))])
                entry = {k: v.to(self.dtype) for k, v in
                         solver_overrides(self.adapter, single, self.solvers).items()}
                self.cache.put(key, entry)
            out.update(entry)
        return out

    def _batches(self, model, rows: list[int] | None):
        windows = self.windows if rows is None else self.windows[list(rows)]
        if self.reference is not None:
            return iter_kl(model, windows, self.reference if rows is None else self.reference.select(rows))
        return iter_nll(model, windows, batch_size=self.batch_size)

    @torch.no_grad()
    def evaluate(self, subnet: Subnet, *, rows: list[int] | None = None,
                 on_batch: Callable[[int, float], bool] | None = None) -> FitnessResult:
        """The fitness of ``subnet`` on every window, or on the windows ``rows`` (staged selection);
        ``on_batch(step, running value)`` returning True stops early."""
        total, count, running = 0.0, 0, []
        overrides = self.overrides(subnet)
        with subnet_view(self.adapter, subnet, overrides) as model:
            for step, (summed, n) in enumerate(self._batches(model, rows)):
                total += summed
                count += n
                running.append(total / count if self.kind == "kl" else math.exp(total / count))
                if on_batch is not None and on_batch(step, running[-1]):
                    return FitnessResult(running[-1], running, pruned=True)
        return FitnessResult(running[-1], running)
