"""KL divergence of a model's next-token distributions from a reference (the dense model's).

The reference is computed once on fixed windows and kept as each position's top-K log-probabilities,
their token ids, and the log of the probability mass outside them. A candidate's divergence at a
position is then the KL between the two distributions coarsened to K + 1 outcomes (the K reference
tokens, and "any other token")::

    KL_K(p ‖ q) = Σ_{k ≤ K} p_k (log p_k − log q_k) + p_rest (log p_rest − log q_rest)

which never exceeds the full KL (the log-sum inequality) and equals it when K is the vocabulary.
Memory is K (log-probability + id) per token instead of the vocabulary: 8 windows of 512 tokens at
K = 256 are 8 MB, where full float32 distributions of a 49k vocabulary would be 0.8 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.perplexity import logit_chunks


@dataclass
class Reference:
    """Per batch of windows: top-K log-probs (b, T-1, K), their token ids, and log p_rest (b, T-1)."""

    log_probs: list[torch.Tensor]
    ids: list[torch.Tensor]
    log_rest: list[torch.Tensor]
    batch_size: int
    top_k: int
    _whole: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def select(self, rows: list[int]) -> "Reference":
        """The reference of the windows ``rows`` (in that order), batched like this one."""
        if self._whole is None:  # every window's tensors in one piece; the batches become views of it
            self._whole = tuple(torch.cat(store) for store in (self.log_probs, self.ids, self.log_rest))
            self.log_probs, self.ids, self.log_rest = (list(whole.split(self.batch_size)) for whole in self._whole)
        parts = [list(whole[list(rows)].split(self.batch_size)) for whole in self._whole]
        return Reference(*parts, batch_size=self.batch_size, top_k=self.top_k)


def _log_rest(top_log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top)), clamped to a tiny floor when the top-K hold all the mass."""
    covered = torch.logsumexp(top_log_probs, dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(covered)).clamp(min=1e-30))  # log(1 − e^covered)


@torch.no_grad()
def reference(model: nn.Module, windows: torch.Tensor, *, top_k: int, batch_size: int = 8) -> Reference:
    """The next-token distributions of ``model`` on ``windows``, kept at their top ``top_k`` tokens."""
    device = next(model.parameters()).device
    ref = Reference([], [], [], batch_size, top_k)
    for first in range(0, windows.shape[0], batch_size):
        ids = windows[first : first + batch_size].to(device)
        parts = [[], [], []]
        for _, logits in logit_chunks(model, ids):
            log_probs = F.log_softmax(logits, dim=-1)
            top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            parts[0].append(top.values)
            parts[1].append(top.indices.to(torch.int32))
            parts[2].append(_log_rest(top.values) if top_k < log_probs.shape[-1] else
                            torch.full(top.values.shape[:-1], float("-inf"), device=device))
        for store, chunks in zip((ref.log_probs, ref.ids, ref.log_rest), parts):
            store.append(torch.cat(chunks, dim=1))
    return ref


def _xlogy_diff(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """p (log p − log q) with 0 · anything = 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))


@torch.no_grad()
def batch_kl(model: nn.Module, input_ids: torch.Tensor, log_probs: torch.Tensor, ids: torch.Tensor,
             log_rest: torch.Tensor) -> tuple[float, int]:
    """Summed KL_K(reference ‖ model) over every position of a batch, and the position count."""
    total = 0.0
    for start, logits in logit_chunks(model, input_ids):
        end = start + logits.shape[1]
        q = F.log_softmax(logits, dim=-1)
        q_top = q.gather(-1, ids[:, start:end].long())
        p_top, p_rest = log_probs[:, start:end], log_rest[:, start:end]
        total += float(_xlogy_diff(p_top, q_top).sum() + _xlogy_diff(p_rest, _log_rest(q_top)).sum())
    return total, log_probs.shape[0] * log_probs.shape[1]
