"""The layer-wise calibration data path: capture the first block's inputs once, then walk the
blocks one at a time, collecting statistics of the inputs of chosen linears.

Memory stays that of one block's activations plus one block's statistics, whatever the depth
(the SparseGPT/Wanda loop). The first block's call is captured with all its positional and
keyword arguments (position embeddings, masks, cache objects...), so nothing about the
family's forward has to be known here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from space.adapters import LayerAdapter, ModelAdapter


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first block's inputs."""


@dataclass
class BlockInputs:
    """The calibration batches as they enter one block: hidden states and the rest of the call."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]

    def __len__(self) -> int:
        return len(self.hidden)

    def calls(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        yield from zip(self.hidden, self.args, self.kwargs)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.args, self.kwargs)


@torch.no_grad()
def capture_block_inputs(adapter: ModelAdapter, windows: torch.Tensor, *, batch_size: int = 8) -> BlockInputs:
    """Run the embeddings on ``windows`` (n x seqlen token ids) and keep what the first block gets."""
    first = adapter.decoder_layers()[0]
    device = next(adapter.model.parameters()).device
    captured = BlockInputs([], [], [])

    def hook(_module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.hidden.append(hidden)
        captured.args.append(rest)
        captured.kwargs.append(kwargs)
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                adapter.model(windows[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(layer: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch."""
    return [_block_output(layer(hidden, *args, **kwargs)) for hidden, args, kwargs in inputs.calls()]


class InputStats:
    """Running statistics of the inputs of one linear over calibration tokens, in float64:
    count, per-channel sum and sum of squares, and optionally ``C = XᵀX``."""

    def __init__(self, width: int, *, gram: bool, device: torch.device):
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(width, dtype=torch.float64, device=device)
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        x64 = x.double()  # sums of squares of large activations lose the variance in float32
        self.count += x.shape[0]
        self.sum += x64.sum(0)
        self.sumsq += x64.square().sum(0)
        if self.gram is not None:
            # One float32 product per batch (the costly part), accumulated in float64.
            x32 = x.float()
            self.gram += (x32.T @ x32).double()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance over tokens (population form, as FLAP's running estimate)."""
        return (self.sumsq / self.count - self.mean.square()).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """Per-channel L2 norm over tokens, ‖X[:, j]‖₂."""
        return self.sumsq.sqrt()


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
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Iterator[LayerStats]:
    """Yield each layer's statistics in order, feeding each block the previous block's output."""
    inputs = capture_block_inputs(adapter, windows, batch_size=batch_size)
    wanted = set(range(len(adapter.layers)) if layers is None else layers)
    for layer in progress(adapter.layers):
        if layer.index > max(wanted):
            break
        stats, outputs = collect_layer_stats(layer, inputs, request if layer.index in wanted else StatsRequest((), ()))
        inputs = inputs.with_hidden(outputs)
        if layer.index in wanted:
            yield stats
