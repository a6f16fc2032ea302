"""Passes of a block that hold what its output projections see, so that a block whose output
projections change needs no whole pass again.

* :func:`attention_pass`: one pass stopped after the attention sub-layer keeps o_proj's inputs (and
  their statistics). Those inputs do not depend on o_proj's weights, so once o_proj is refitted,
  :meth:`AttentionPass.replayed` has the attention module return ``o_proj(inputs)`` without
  computing the attention again: the very tensor it would return (the same module on the same
  inputs), so every later pass over the block is the block's own, bit for bit, at the cost of its
  MLP only.
* :func:`last_linear_pass`: in a family whose sub-layers add their output projection to the
  residual stream as it is (``ModelAdapter.plain_residual``), a block ends in ``h + down(x)``:
  ``h`` (the stream after attention) and ``x`` (down_proj's inputs) do not depend on down_proj's
  weights. One pass with down_proj's output replaced by zeros gives ``x`` (for its second moment)
  and ``h + 0 = h``; after the refit the block's outputs are ``h + down(x)``, one matmul instead of
  the whole block again. It is the very sum the block computes (the same module on the same
  inputs, then the same addition), so the outputs are the block's own, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from space.calibration import BlockInputs, linear_input_stats, run_block, swapped_forwards
from space.input_stats import InputStats


def _recorder(linear: nn.Module, *, gram: bool):
    """The statistics of ``linear``'s inputs, the inputs themselves (per batch), and the forward
    pre-hook that fills both."""
    stats = InputStats(linear.in_features, gram=gram, device=linear.weight.device)
    seen: list[torch.Tensor] = []

    def record(_module, args):
        seen.append(args[0])
        stats.add(args[0])

    return stats, seen, record


class _AttentionDone(Exception):
    """Raised after the attention sub-layer to stop the block there."""


@dataclass
class AttentionPass:
    stats: InputStats  # of o_proj's inputs over every batch
    attention: nn.Module  # the attention sub-layer
    output: nn.Module  # its output projection (o_proj)
    inputs: list[torch.Tensor]  # o_proj's inputs, per batch
    arity: int | None  # the length of the tuple the attention module returns (None: a tensor)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """While the body runs one pass over the batches (in the pass's order), the attention module
        returns o_proj, as it is now, applied to the recorded inputs instead of computing the attention."""
        batches = iter(self.inputs)

        def forward(*_args, **_kwargs):
            x = next(batches, None)
            if x is None:
                raise RuntimeError("the attention was replayed on more batches than its pass recorded")
            out = self.output(x)
            return out if self.arity is None else (out,) + (None,) * (self.arity - 1)

        with swapped_forwards({self.attention: forward}):
            yield


@torch.no_grad()
def attention_pass(block: nn.Module, attention: nn.Module, output: nn.Module, inputs: BlockInputs, *,
                   gram: bool) -> AttentionPass:
    """Run every batch of ``inputs`` through ``block`` up to the end of ``attention`` (its sub-layer,
    ``output`` its o_proj): o_proj's inputs and their statistics."""
    stats, seen, record = _recorder(output, gram=gram)
    arity: list[int | None] = []

    def stop(_module, _args, out):
        arity.append(len(out) if isinstance(out, tuple) else None)
        raise _AttentionDone

    handles = [output.register_forward_pre_hook(record), attention.register_forward_hook(stop)]
    try:
        for hidden, args, kwargs in inputs.calls(block):
            try:
                block(hidden, *args, **kwargs)
            except _AttentionDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(inputs) or len(arity) != len(inputs):
        raise RuntimeError("the block did not call its attention and o_proj once per batch")
    return AttentionPass(stats, attention, output, seen, arity[0])


@dataclass
class LastLinearPass:
    stats: InputStats  # of the linear's inputs over every batch
    block: nn.Module
    calls: BlockInputs  # the batches the pass ran
    inputs: list[torch.Tensor] | None  # the linear's inputs, per batch (plain residual only)
    rest: list[torch.Tensor] | None  # the block's outputs with the linear's output replaced by zeros, per batch
    attention: AttentionPass | None  # replayed in the block's passes, when given

    def outputs(self, linear: nn.Module) -> list[torch.Tensor]:
        """The block's outputs with ``linear`` as it is now: its weights refitted since the pass, and
        perhaps narrowed to a prefix of its input columns (a subnet view: the kept ones first). Without a
        plain residual (a norm after the linear) the block runs again."""
        if self.rest is None:
            with _replaying(self.attention):
                return run_block(self.block, self.calls)
        width = linear.weight.shape[-1]
        return [rest + linear(x if x.shape[-1] == width else x[..., :width]) for rest, x in zip(self.rest, self.inputs)]


def _replaying(attention: AttentionPass | None):
    return nullcontext() if attention is None else attention.replayed()


@torch.no_grad()
def last_linear_pass(block: nn.Module, linear: nn.Module, inputs: BlockInputs, *, gram: bool,
                     plain: bool, attention: AttentionPass | None = None) -> LastLinearPass:
    """Run every batch of ``inputs`` through ``block`` once with ``linear`` (the block's last linear)
    silenced: its inputs' statistics, the inputs, and the rest of the output. ``plain``: the block's
    output is the rest plus the linear's (``ModelAdapter.plain_residual``); otherwise the pass stops
    at the linear and :meth:`LastLinearPass.outputs` runs the block again. ``attention``: the block's
    attention pass on the same ``inputs``, replayed instead of the attention (:meth:`AttentionPass.replayed`)."""
    if not plain:
        with _replaying(attention):
            stats = linear_input_stats(block, linear, inputs, gram=gram)
        return LastLinearPass(stats, block, inputs, None, None, attention)
    stats, seen, record = _recorder(linear, gram=gram)

    def silence(_module, _args, output):
        return torch.zeros_like(output)

    handles = [linear.register_forward_pre_hook(record), linear.register_forward_hook(silence)]
    try:
        with _replaying(attention):
            rest = run_block(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return LastLinearPass(stats, block, inputs, seen, rest, attention)
