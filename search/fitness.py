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

A candidate's forward pass starts where it first differs from one scored before on the same
windows (:class:`PrefixStates`): a level switch or a mutation changes a few layers of its parent,
so the hidden states entering the first changed layer are those of an earlier candidate, kept. The
same operations run on the same inputs from there, so the value is the one a full pass gives, bit
for bit; the staged evolution's children skip about 30 % of their blocks this way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from evaluators.divergence import batch_kl, reference
from evaluators.perplexity import batch_nll
from reform.local import solver_overrides
from space.adapters import ModelAdapter
from space.calibration import block_output, swapped_forwards
from space.views import subnet_view
from space.subnet import LayerWidths, ModelDims, Subnet


NAMES = {"ppl": "calibration perplexity", "kl": "calibration KL to the dense model"}  # what each kind measures
KINDS = tuple(NAMES)
CACHE_BYTES = 1 << 30  # rectified layers (the layer cache): its smallest bound (cache_bound)
PREFIX_BYTES = 512 << 20  # kept hidden states (PrefixStates)


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

    def peek(self, key):
        """The entry (refreshed), without counting a hit or a miss."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, value: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in value.values())
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old.values())


def cache_bound(dims: ModelDims, ratio: float, dtype_bytes: int) -> int:
    """The layer cache's bound for a search at ``ratio``: two candidates' rectified layers (a parent's,
    which every child of a generation reuses, and the child's few new ones), at least ``CACHE_BYTES``.
    Less than a candidate's layers and scoring a child evicts, least recently used first, the parent's
    layers it needs next (an 8B candidate's are 1.9 GB)."""
    layer = dtype_bytes * dims.hidden_size * (dims.num_heads * dims.head_dim + dims.intermediate_size)
    return max(CACHE_BYTES, int(2 * dims.num_layers * layer * ratio))


class PrefixStates:
    """Hidden states entering each layer of the candidates scored lately, keyed by the batch (its
    windows) and the widths of every layer before it; least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.cache = _LayerCache(max_bytes)
        self.skipped = self.run = 0  # blocks skipped / run, over every batch scored

    @contextmanager
    def reusing(self, blocks: list[torch.nn.Module], batch, widths: list[LayerWidths]) -> Iterator[None]:
        """The model's forward pass on ``batch`` inside the body starts at the deepest layer whose
        input is kept for these widths (the blocks before it return that input at once) and keeps
        the input of every later layer."""
        prefix = [tuple(widths[:depth]) for depth in range(len(widths))]
        start, kept = 0, None
        for depth in range(len(widths) - 1, 0, -1):
            kept = self.cache.peek((batch, prefix[depth]))
            if kept is not None:
                start = depth
                break
        self.skipped += start
        self.run += len(blocks) - start
        if self.cache.max_bytes <= 0:
            yield
            return

        def keep(depth: int):
            def hook(_module, _args, output):
                self.cache.put((batch, prefix[depth]), {"hidden": block_output(output).detach()})
            return hook

        handles = [blocks[depth - 1].register_forward_hook(keep(depth)) for depth in range(start + 1, len(blocks))]
        try:
            with swapped_forwards({block: lambda *args, **kwargs: kept["hidden"] for block in blocks[:start]}):
                yield
        finally:
            for handle in handles:
                handle.remove()


class Fitness:
    """Scores subnets of one permuted model on fixed calibration windows.

    Args:
        adapter: the permuted model, in the dtype candidates are scored in.
        windows: calibration windows (never a test split), fixed for the whole search.
        solvers: per layer ``{"o": PrefixLstsq, "down": PrefixLstsq}`` from
            :func:`reform.local.output_solvers`; None scores candidates without rectification.
        batch_size: windows per forward pass (one intermediate value each).
        cache_bytes: memory for cached rectified layers.
        prefix_bytes: memory for kept hidden states (:class:`PrefixStates`; 0: every pass whole).
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
        cache_bytes: int = CACHE_BYTES,
        prefix_bytes: int = PREFIX_BYTES,
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
        self.prefix = PrefixStates(prefix_bytes)
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

    def _batches(self, model, rows: list[int] | None, widths: list[LayerWidths]):
        """(summed loss, count) per batch of the windows ``rows`` (all when None), each batch's pass
        starting where an earlier candidate's kept hidden states allow."""
        ref = self.reference if rows is None or self.reference is None else self.reference.select(rows)
        rows = list(range(self.windows.shape[0])) if rows is None else list(rows)
        size = ref.batch_size if ref is not None else self.batch_size
        device = next(model.parameters()).device
        blocks = list(self.adapter.decoder_layers())
        for i, first in enumerate(range(0, len(rows), size)):
            batch = tuple(rows[first : first + size])
            ids = self.windows[list(batch)].to(device)
            with self.prefix.reusing(blocks, batch, widths):
                if ref is None:
                    result = batch_nll(model, ids)
                else:
                    result = batch_kl(model, ids, ref.log_probs[i], ref.ids[i], ref.log_rest[i])
            yield result

    @torch.no_grad()
    def evaluate(self, subnet: Subnet, *, rows: list[int] | None = None,
                 on_batch: Callable[[int, float], bool] | None = None) -> FitnessResult:
        """The fitness of ``subnet`` on every window, or on the windows ``rows`` (staged selection);
        ``on_batch(step, running value)`` returning True stops early."""
        total, count, running = 0.0, 0, []
        overrides = self.overrides(subnet)
        with subnet_view(self.adapter, subnet, overrides) as model:
            for step, (summed, n) in enumerate(self._batches(model, rows, subnet.layers)):
                total += summed
                count += n
                running.append(total / count if self.kind == "kl" else math.exp(total / count))
                if on_batch is not None and on_batch(step, running[-1]):
                    return FitnessResult(running[-1], running, pruned=True)
        return FitnessResult(running[-1], running)
