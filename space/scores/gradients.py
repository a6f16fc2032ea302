"""Gradient-based importance scores (METHODS.md section 2): ``taylor`` (LLM-Pruner) and ``ntk``
(NIRVANA).

Both multiply every block weight by the gradient of a scalar objective over calibration windows
and sum the products over the weights of a unit: a query head is its q rows and o columns, a
KV group its heads plus its k and v rows, an MLP channel its gate row, up row and down column.

The gradients are accumulated micro-batch by micro-batch, with activation checkpointing on every
block and gradients kept for the block linears' weights only, so memory is one micro-batch's
activations at a time plus one float32 copy of the block weights per accumulator, whatever the
number of windows. Everything runs on the model's device (the CPU here).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from space.adapters import LayerAdapter, ModelAdapter
from space.scores.base import LayerScores, ScoreContext, register_score

TAYLOR_MODES = ("element1", "element2", "vector")
TAYLOR_SCORES = {"taylor": "element1", "taylor-element2": "element2", "taylor-vector": "vector"}  # name -> mode


# --- objectives (summed over the windows of a micro-batch; divided by the total count outside) ---


def next_token_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a micro-batch and its token count (LLM-Pruner's L)."""
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss, targets.numel()


def max_logit(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """NIRVANA's f: per window, the mean over the vocabulary of the maximum over the sequence of
    the logits; summed over the micro-batch, with its window count."""
    logits = model(ids, use_cache=False).logits.float()
    return logits.max(dim=1).values.mean(dim=1).sum(), ids.shape[0]


OBJECTIVES = {"next-token": next_token_loss, "max-logit": max_logit}


# --- gradients --------------------------------------------------------------------------------


def block_weights(adapter: ModelAdapter) -> list[torch.nn.Parameter]:
    return [linear.weight for layer in adapter.layers for linear in layer.linears().values()]


@contextmanager
def gradient_mode(adapter: ModelAdapter):
    """Gradients for the block linears' weights only, every block checkpointed; restored on exit."""
    model = adapter.model
    weights = {id(w) for w in block_weights(adapter)}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(id(p) in weights)
        p.grad = None
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active in training mode only; these decoders have no dropout
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.train(was_training)
        for p, flag in saved:
            p.grad = None
            p.requires_grad_(flag)


def accumulate(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    objective: str,
    *,
    batch_size: int = 1,
    squares: bool = False,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The gradient of the objective's mean over ``windows`` for every block weight (in
    :func:`block_weights` order), and with ``squares`` the mean over windows of each window's own
    squared gradient (the empirical Fisher diagonal of LLM-Pruner's element², one backward pass
    per window)."""
    fn = OBJECTIVES[objective]
    device = next(adapter.model.parameters()).device
    step = 1 if squares else batch_size
    batches = [windows[i : i + step].to(device) for i in range(0, windows.shape[0], step)]
    with gradient_mode(adapter):
        weights = block_weights(adapter)
        if not squares:
            counts = [_count(fn, b) for b in batches]
            total = sum(counts)
            for ids in progress(batches):
                value, _ = fn(adapter.model, ids)
                (value / total).backward()
            return [w.grad.detach().clone() for w in weights], None
        grad = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        total = sum(_count(fn, b) for b in batches)
        for ids in progress(batches):
            value, count = fn(adapter.model, ids)
            (value / count).backward()  # this window's own mean objective
            for w, g, f in zip(weights, grad, fisher):
                g.add_(w.grad, alpha=count / total)
                f.add_(w.grad.square(), alpha=1 / len(batches))
                w.grad = None
        return grad, fisher


def _count(fn, ids: torch.Tensor) -> int:
    return ids.shape[0] * (ids.shape[1] - 1) if fn is next_token_loss else ids.shape[0]


# --- from per-weight saliency to units --------------------------------------------------------


def unit_scores(layer: LayerAdapter, saliency: dict[str, torch.Tensor], ctx: ScoreContext, *,
                signed: bool = False) -> LayerScores:
    """Sum per-weight saliencies (keyed like :meth:`LayerAdapter.linears`) over each unit's
    weights; with ``signed`` the sums are of signed terms and their absolute value is the score
    (LLM-Pruner's vector-wise importance)."""
    s = {name: t.double() for name, t in saliency.items()}
    hd, g = ctx.head_dim, ctx.group_size
    heads = (s["q"].sum(1) + s["o"].sum(0)).view(-1, hd).sum(1)
    kv = (s["k"].sum(1) + s["v"].sum(1)).view(-1, hd).sum(1)
    groups = heads.view(-1, g).sum(1) + kv
    channels = s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)
    if signed:
        heads, groups, channels = heads.abs(), groups.abs(), channels.abs()
    return LayerScores(heads, groups, channels)


def _per_layer(adapter: ModelAdapter, tensors: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    it = iter(tensors)
    return [{name: next(it) for name in layer.linears()} for layer in adapter.layers]


def taylor_scores(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, modes=TAYLOR_MODES,
                  batch_size: int = 1, progress: Callable = lambda it: it) -> dict[str, list[LayerScores]]:
    """LLM-Pruner's Taylor importances of every unit from one set of gradients of the next-token
    loss: ``element1`` Σ|W⊙g|, ``element2`` Σ|W⊙g − ½·W⊙F⊙W| (F: mean per-window g²),
    ``vector`` |Σ W⊙g|. Asking for element2 costs one backward pass per window."""
    grad, fisher = accumulate(adapter, windows, "next-token", batch_size=batch_size,
                              squares="element2" in modes, progress=progress)
    grads, fishers = _per_layer(adapter, grad), _per_layer(adapter, fisher) if fisher else None
    out: dict[str, list[LayerScores]] = {mode: [] for mode in modes}
    for i, layer in enumerate(adapter.layers):
        w = {name: m.weight.detach().float() for name, m in layer.linears().items()}
        first = {name: w[name] * grads[i][name] for name in w}
        for mode in modes:
            if mode == "element1":
                out[mode].append(unit_scores(layer, {n: t.abs() for n, t in first.items()}, ctx))
            elif mode == "vector":
                out[mode].append(unit_scores(layer, first, ctx, signed=True))
            else:
                second = {n: (first[n] - 0.5 * w[n] * fishers[i][n] * w[n]).abs() for n in w}
                out[mode].append(unit_scores(layer, second, ctx))
    return out


@register_score("taylor", whole_model=True, streamed=False, source="LLM-Pruner (element-wise first order, their default)")
def taylor(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 1,
           progress: Callable = lambda it: it) -> list[LayerScores]:
    return taylor_scores(adapter, windows, ctx, modes=("element1",), batch_size=batch_size,
                         progress=progress)["element1"]


@register_score("taylor-element2", whole_model=True, streamed=False, source="LLM-Pruner (element-wise, second order)")
def taylor_element2(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 1,
                    progress: Callable = lambda it: it) -> list[LayerScores]:
    return taylor_scores(adapter, windows, ctx, modes=("element2",), progress=progress)["element2"]


@register_score("taylor-vector", whole_model=True, streamed=False, source="LLM-Pruner (vector-wise)")
def taylor_vector(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 1,
                  progress: Callable = lambda it: it) -> list[LayerScores]:
    return taylor_scores(adapter, windows, ctx, modes=("vector",), batch_size=batch_size,
                         progress=progress)["vector"]


@register_score("ntk", whole_model=True, streamed=False, standardized=True, source="NIRVANA (NTK saliency, max-logit objective)")
def ntk(adapter: ModelAdapter, windows: torch.Tensor, ctx: ScoreContext, *, batch_size: int = 1,
        progress: Callable = lambda it: it) -> list[LayerScores]:
    """|W ⊙ ∂f/∂W| summed over each unit, f the mean over windows and vocabulary of the
    max-over-sequence logits, from one backward pass. Saliencies of one scalar f are comparable
    across layers, hence ``standardized``; NIRVANA prunes attention by whole KV groups."""
    grad, _ = accumulate(adapter, windows, "max-logit", batch_size=batch_size, progress=progress)
    grads = _per_layer(adapter, grad)
    return [
        unit_scores(layer, {n: (m.weight.detach().float() * grads[i][n]).abs() for n, m in layer.linears().items()}, ctx)
        for i, layer in enumerate(adapter.layers)
    ]
