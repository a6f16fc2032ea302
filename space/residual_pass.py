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

from space.calibration import BlockInputs, InputStats, linear_input_stats, run_block


@dataclass
class LastLinearPass:
    stats: InputStats  # of the linear's inputs over every batch
    block: nn.Module
    calls: BlockInputs  # the batches the pass ran
    inputs: list[torch.Tensor] | None  # the linear's inputs, per batch (plain residual only)
    rest: list[torch.Tensor] | None  # the block's outputs with the linear's output replaced by zeros, per batch

    def outputs(self, linear: nn.Module) -> list[torch.Tensor]:
        """The block's outputs with ``linear`` as it is now: its weights refitted since the pass, and
        perhaps narrowed to a prefix of its input columns (a subnet view: the kept ones first). Without a
        plain residual (a norm after the linear) the block runs again."""
        if self.rest is None:
            return run_block(self.block, self.calls)
        width = linear.weight.shape[-1]
        return [rest + linear(x if x.shape[-1] == width else x[..., :width]) for rest, x in zip(self.rest, self.inputs)]


@torch.no_grad()
def last_linear_pass(block: nn.Module, linear: nn.Module, inputs: BlockInputs, *, gram: bool,
                     plain: bool) -> LastLinearPass:
    """Run every batch of ``inputs`` through ``block`` once with ``linear`` (the block's last linear)
    silenced: its inputs' statistics, the inputs, and the rest of the output. ``plain``: the block's
    output is the rest plus the linear's (``ModelAdapter.plain_residual``); otherwise the pass stops
    at the linear and :meth:`LastLinearPass.outputs` runs the block again."""
    if not plain:
        return LastLinearPass(linear_input_stats(block, linear, inputs, gram=gram), block, inputs, None, None)
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
    return LastLinearPass(stats, block, inputs, seen, rest)
