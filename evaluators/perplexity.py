"""Perplexity over token windows, as PROTOCOL.md measures it.

Each window is scored on its own: the loss covers every token but the first, and perplexity is
exp(mean NLL) over all scored tokens. Logits are formed a chunk of positions at a time from the
final hidden states, at most ``LOGIT_ROWS`` (window, position) rows a chunk, so a batch of
2048-token windows of a 50k-vocabulary model never materialises its full float32 logits.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Rows of logits formed at once, over the batch's windows together: a batch of 8 x 512-token windows takes 64
# positions a chunk, not all 511 (0.8 GB of float32 logits and as much log-softmax for SmolLM2's 49k vocabulary,
# 2 GB each for a 128k one); the KL fitness scores the same to 2e-7 and 3-6 % faster on a CPU (logit_rows.md)
LOGIT_ROWS = 512


def logit_positions(batch: int) -> int:
    """Positions per chunk of logits for a batch of ``batch`` windows."""
    return max(1, LOGIT_ROWS // batch)


def _chunked_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) when logits are a plain linear map of the decoder's output."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or not isinstance(head, nn.Linear):
        return None
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        return None
    return get_decoder(), head


@torch.no_grad()
def logit_chunks(model: nn.Module, input_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """The float32 next-token logits of every position but the last, :func:`logit_positions` at a time:
    ``(first position, logits)`` pairs, so a batch's full logits never exist at once."""
    parts = _chunked_head(model)
    if parts is None:
        yield 0, model(input_ids, use_cache=False).logits[:, :-1].float()
        return
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    step = logit_positions(hidden.shape[0])
    for start in range(0, hidden.shape[1], step):
        yield start, head(hidden[:, start : start + step]).float()


@torch.no_grad()
def batch_nll(model: nn.Module, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a batch of windows (all positions but the first) and its count."""
    targets = input_ids[:, 1:]
    total = 0.0
    for start, logits in logit_chunks(model, input_ids):
        chunk_targets = targets[:, start : start + logits.shape[1]]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk_targets.reshape(-1), reduction="sum"
        ).item()
    return total, targets.numel()


def iter_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1) -> Iterator[tuple[float, int]]:
    """(summed NLL, token count) per batch, so a caller can report or stop early."""
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        yield batch_nll(model, windows[start : start + batch_size].to(device))


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: Callable = lambda it, **_: it,
) -> float:
    """exp(mean NLL) of ``model`` over ``windows`` (n x seqlen token ids)."""
    total, count = 0.0, 0
    batches = math.ceil(windows.shape[0] / batch_size)
    for nll, n in progress(iter_nll(model, windows, batch_size=batch_size), total=batches):
        total += nll
        count += n
    return math.exp(total / count)


def count_params(model: nn.Module) -> dict[str, int]:
    """Block weights (every linear inside the decoder layers) and all parameters."""
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else []
    block = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return {"block": block, "total": total}
