"""One pass of a block for both the statistics of its last linear's inputs and, once that linear is
refitted, the block's outputs.

In a family whose sub-layers add their output projection to the residual stream as it is
(``ModelAdapter.plain_residual``), a block ends in ``h + down(x)``: ``h`` (the stream after
attention) and ``x`` (down_proj's inputs) do not depend on down_proj's weights. One pass with
down_proj's output replaced by zeros gives ``x`` (for its second moment) and ``h + 0 = h``;
after the refit the block's outputs are ``h + down(x)``, one matmul instead of the whole block
again. It is the very sum the block computes (the same module on the same inputs, then the same
addition), so the outputs are the block's own, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from space.calibration import BlockInputs, InputStats, run_block


@dataclass
class LastLinearPass:
    stats: InputStats  # of the linear's inputs over every batch
    inputs: list[torch.Tensor]  # the linear's inputs, per batch
    rest: list[torch.Tensor]  # the block's outputs with the linear's output replaced by zeros, per batch

    def outputs(self, linear: nn.Module) -> list[torch.Tensor]:
        """The block's outputs with ``linear`` as it is now: its weights refitted since the pass, and
        perhaps narrowed to a prefix of its input columns (a subnet view: the kept ones first)."""
        width = linear.weight.shape[-1]
        return [rest + linear(x if x.shape[-1] == width else x[..., :width]) for rest, x in zip(self.rest, self.inputs)]


@torch.no_grad()
def last_linear_pass(block: nn.Module, linear: nn.Module, inputs: BlockInputs, *, gram: bool) -> LastLinearPass:
    """Run every batch of ``inputs`` through ``block`` once with ``linear`` (the last linear of a
    plain-residual block) silenced: its inputs' statistics, the inputs, and the rest of the output."""
    stats = InputStats(linear.in_features, gram=gram, device=linear.weight.device)
    seen: list[torch.Tensor] = []

    def record(_module, args):
        seen.append(args[0])
        stats.add(args[0])

    def silence(_module, _args, output):
        return torch.zeros_like(output)

    handles = [linear.register_forward_pre_hook(record), linear.register_forward_hook(silence)]
    try:
        rest = run_block(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return LastLinearPass(stats, seen, rest)
