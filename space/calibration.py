"""The layer-wise calibration data path: capture the first block's inputs once, then walk the
blocks one at a time, collecting statistics of the inputs of chosen linears.

Memory stays that of one block's activations plus one block's statistics, whatever the depth
(the SparseGPT/Wanda loop). Every block's call is captured with all its positional and
keyword arguments (position embeddings, masks, cache objects...), so nothing about the
family's forward has to be known here: most families pass every block the same ones; where they
differ (Gemma's sliding-window and full-attention layers get different masks and RoPE), a block
gets its own (:meth:`BlockInputs.calls`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from space.adapters import LayerAdapter, ModelAdapter
from space.input_stats import InputStats


class _Captured(Exception):
    """Raised by the last block's recorder to stop the forward pass before the head."""


_ABSENT = object()


@dataclass
class BlockInputs:
    """The calibration batches as they enter one block: hidden states and the rest of the call
    (the first block's), and for each block called otherwise, per batch, the keyword arguments
    that differ from the first block's."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    block_kwargs: dict[nn.Module, list[dict]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    def calls(self, block: nn.Module | None = None) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        """Every batch's call of ``block`` (the first block's call when ``None``)."""
        own = self.block_kwargs.get(block) if block is not None else None
        for i, (hidden, args, kwargs) in enumerate(zip(self.hidden, self.args, self.kwargs)):
            yield hidden, args, ({**kwargs, **own[i]} if own else kwargs)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.args, self.kwargs, self.block_kwargs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BlockInputs":
        """The same calls with every tensor in them on ``device``, the floating ones in ``dtype``."""
        def moved(value):
            return _moved(value, device, dtype)

        return BlockInputs(moved(self.hidden), moved(self.args), moved(self.kwargs),
                           {block: moved(calls) for block, calls in self.block_kwargs.items()})


def _moved(value, device, dtype=None):
    """``value`` with the tensors in it (through tuples, lists and dicts) on ``device``, the floating
    ones in ``dtype`` (None: unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    return value


@contextmanager
def block_on(block: nn.Module, device: torch.device | str | None) -> Iterator[None]:
    """``block`` on ``device`` while the body runs, then back where it was: the streamed preparation
    of a model kept in host memory, one block at a time on the GPU (``device`` None: stays put)."""
    if device is None:
        yield
        return
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


@contextmanager
def block_in(block: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """``block``'s floating parameters in ``dtype`` while the body runs, then the originals back
    untouched (a round trip through a narrower dtype would lose their low bits; ``dtype`` None:
    stays as it is). The copies cost one block's parameters at a time."""
    saved = [] if dtype is None else [(module, name, param) for module in block.modules()
                                      for name, param in module._parameters.items()
                                      if param is not None and param.is_floating_point() and param.dtype != dtype]
    for module, name, param in saved:
        module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for module, name, param in reversed(saved):
            module._parameters[name] = param


@torch.no_grad()
def capture_block_inputs(adapter: ModelAdapter, windows: torch.Tensor, *, batch_size: int = 8,
                         execution_device: torch.device | str | None = None) -> BlockInputs:
    """Run the embeddings on ``windows`` (n x seqlen token ids) and keep what the first block gets,
    and how every other block is called: each block's forward is swapped for a recorder that
    passes its input on, and the last one stops the pass. ``execution_device``: where the blocks
    will run (the inputs are moved there), when not the model's."""
    blocks = list(adapter.decoder_layers())
    device = next(adapter.model.parameters()).device
    captured = BlockInputs([], [], [])
    differing: dict[nn.Module, list[dict]] = {block: [] for block in blocks[1:]}

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                captured.hidden.append(hidden)
                captured.args.append(rest)
                captured.kwargs.append(kwargs)
            else:
                first = captured.kwargs[-1]
                differing[blocks[index]].append({k: v for k, v in kwargs.items() if first.get(k, _ABSENT) is not v})
            if index == len(blocks) - 1:
                raise _Captured
            return hidden

        return forward

    with swapped_forwards({block: recorder(index) for index, block in enumerate(blocks)}):
        for start in range(0, windows.shape[0], batch_size):
            try:
                adapter.model(windows[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    captured.block_kwargs = {block: calls for block, calls in differing.items() if any(calls)}
    return captured if execution_device is None else captured.to(execution_device)


@contextmanager
def swapped_forwards(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """Each module's ``forward`` replaced by the given callable while the body runs (the model's own
    forward pass still drives them), then restored, an instance's own forward included (e.g.
    accelerate's device hooks)."""
    own = {module: module.__dict__.get("forward") for module in forwards}
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in own.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def block_output(output):
    """A decoder block's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(layer: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch."""
    return [block_output(layer(hidden, *args, **kwargs)) for hidden, args, kwargs in inputs.calls(layer)]


class _Reached(Exception):
    """Raised by a hook to stop a block once a linear's input is known."""


@torch.no_grad()
def input_of(block: nn.Module, module: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, *,
             finish: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input ``module`` receives when ``block`` runs on one batch, and the block's output if
    ``finish``; else the block stops there (an attention projection's input costs no MLP)."""
    seen = []

    def hook(_module, inputs):
        seen.append(inputs[0])
        if not finish:
            raise _Reached

    handle = module.register_forward_pre_hook(hook)
    output = None
    try:
        output = block(hidden, *args, **kwargs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the block never called the linear whose input is wanted")
    return seen[0], (block_output(output) if output is not None else None)


def linear_input_stats(block: nn.Module, module: nn.Module, inputs: BlockInputs, *, gram: bool) -> InputStats:
    """The statistics of ``module``'s inputs over every batch of ``inputs`` through ``block``, each pass
    stopped at ``module`` (:func:`input_of`)."""
    stats = InputStats(module.in_features, gram=gram, device=module.weight.device)
    for hidden, args, kwargs in inputs.calls(block):
        stats.add(input_of(block, module, hidden, args, kwargs)[0])
    return stats


@dataclass
class StatsRequest:
    """Which linear inputs to watch in each layer (by the adapter's short names), and which of
    them need the full second-moment matrix."""

    inputs: tuple[str, ...] = ("o", "down")
    gram: tuple[str, ...] = ()

    def merged(self, other: "StatsRequest") -> "StatsRequest":
        return StatsRequest(
            tuple(dict.fromkeys(self.inputs + other.inputs)), tuple(dict.fromkeys(self.gram + other.gram))
        )


@dataclass
class LayerStats:
    index: int
    inputs: dict[str, InputStats] = field(default_factory=dict)


@torch.no_grad()
def collect_layer_stats(
    layer: LayerAdapter, inputs: BlockInputs, request: StatsRequest
) -> tuple[LayerStats, list[torch.Tensor]]:
    """Statistics of the requested linear inputs of one layer, and the layer's outputs."""
    linears = layer.linears()
    stats = LayerStats(layer.index)
    handles = []
    for name in request.inputs:
        module = linears.get(name)
        if module is None:
            continue
        stats.inputs[name] = InputStats(module.in_features, gram=name in request.gram, device=module.weight.device)

        def hook(_module, args, _name=name):
            stats.inputs[_name].add(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        outputs = run_block(layer.layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


def walk_layers(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    request: StatsRequest,
    *,
    batch_size: int = 8,
    layers: Iterable[int] | None = None,
    execution_device: torch.device | str | None = None,
    pass_dtype: torch.dtype | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Iterator[LayerStats]:
    """Yield each layer's statistics in order, feeding each block the previous block's output.
    ``execution_device``: run each block there (moved in for its turn, and back once its statistics
    are consumed), the rest of the model staying where it is: a model in host memory is prepared on
    a GPU one block at a time. ``pass_dtype``: the blocks run in it (:func:`block_in`; None: the
    model's), the statistics still accumulated in float64."""
    inputs = capture_block_inputs(adapter, windows, batch_size=batch_size,
                                  execution_device=execution_device).to(dtype=pass_dtype)
    wanted = set(range(len(adapter.layers)) if layers is None else layers)
    for layer in progress(adapter.layers):
        if layer.index > max(wanted):
            break
        with block_on(layer.layer, execution_device):
            with block_in(layer.layer, pass_dtype):
                stats, outputs = collect_layer_stats(layer, inputs,
                                                     request if layer.index in wanted else StatsRequest((), ()))
            inputs = inputs.with_hidden(outputs)
            if layer.index in wanted:
                yield stats
