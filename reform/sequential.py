"""Sequential rectification: blocks in order, inputs from the pruned model.

Three modes walk the blocks with the pruned model's hidden states:

* ``sequential``: the target is the dense model's output (the dense stream runs beside the pruned
  one), so a layer also tries to correct the error its pruned upstream left.
* ``upstream`` (Týr-the-Pruner's reconstruction): the target is the layer's own dense weights applied
  to the inputs the pruned model gives it, ``min ‖W X̂ − Ŵ_K X̂_K‖²`` with X̂ from the pruned upstream
  model: the local problem, on the statistics the layer will really see.
* ``residual``: the ``sequential`` target plus the residual stream's drift where the sub-layer's
  output is added, ``min ‖(R + W X_dense) − (R̂ + Ŵ_K X̂_K)‖²`` (R, R̂: the dense and the pruned
  stream there; the block input for o_proj, that plus o_proj's output for down_proj): the pruned
  block's output is fitted to the dense block's, so a layer also absorbs what upstream layers
  lost in the stream. Only for families whose sub-layer outputs join the stream un-normalised
  (``ModelAdapter.plain_residual``).

The ``sequential`` mode in detail:

Two streams of hidden states run side by side from the first block's captured inputs: the dense
model's and the pruned-and-rectified model's, each fed from its own previous block. For each
rectified projection the fit is

    min ‖W X_dense − Ŵ_K X_pruned‖²  →  Ŵ_Kᵀ = (X_prunedᵀ X_pruned + λI)⁻¹ (X_prunedᵀ X_dense) Wᵀ,

so a layer also corrects the error its pruned upstream left (normal equations of the
least-squares problem in Ŵ_K; the pruned stream holds only the kept columns). Inside a block,
o_proj is solved first and the MLP's inputs are then taken with the rectified o_proj in place.

Batches are processed one at a time with both streams at hand (a block is run only up to the
projection's input for the statistics, except the dense pass of a layer's last projection,
which also gives the next dense input), so memory is the two streams' hidden states plus one
projection's moments: independent of depth.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from reform.spec import Problem, ReformSpec, method_spec
from reform.targets import Target, layer_targets
from reform.local import model_home
from reform.reselect import reselect
from space.errors import UserError
from space.calibration import (BlockInputs, block_in, block_on, capture_block_inputs, input_of,
                               linear_input_stats, run_block)
from space.adapters import LayerAdapter, ModelAdapter
from space.input_stats import InputStats
from space.order import LayerOrder
from space.residual_pass import last_linear_pass
from space.views import subnet_view
from space.subnet import LayerWidths, ModelDims, Subnet


class PairedStats:
    """Moments of the inputs the rectified projection sees (pruned stream) and of the dense inputs
    at the same tokens: the pruned inputs' sum and gram, the dense sum, the cross moment, and (residual
    mode) the pruned inputs' cross moment with the residual stream's drift."""

    def __init__(self, seen_width: int, dense_width: int, *, gram: bool, device: torch.device):
        self.seen = InputStats(seen_width, gram=gram, device=device)
        self.dense_sum = torch.zeros(dense_width, dtype=torch.float64, device=device)
        self.cross = torch.zeros(seen_width, dense_width, dtype=torch.float64, device=device) if gram else None
        self.drift: torch.Tensor | None = None

    def add(self, seen: torch.Tensor, dense: torch.Tensor, drift: torch.Tensor | None = None) -> None:
        self.seen.add(seen)
        seen = seen.reshape(-1, seen.shape[-1]).float()
        dense = dense.reshape(-1, dense.shape[-1]).float()
        self.dense_sum += dense.sum(0).double()
        if self.cross is not None:
            self.cross += (seen.T @ dense).double()
        if drift is not None:
            moment = (seen.T @ drift.reshape(-1, drift.shape[-1]).float()).double()
            self.drift = moment if self.drift is None else self.drift + moment

    def problem(self, target: Target) -> Problem:
        return Problem(target.module.weight, target.kept, self.dense_sum / self.seen.count, self.seen.mean,
                       gram=self.seen.gram, cross=self.cross, drift=self.drift)


@contextmanager
def _outputs_of(module: nn.Module | None):
    """The outputs ``module`` gives while a block runs inside (empty when it is not called, e.g. a
    skipped attention, or is None: nothing watched)."""
    seen: list[torch.Tensor] = []
    if module is None:
        yield seen
        return
    handle = module.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def _stream(target: Target, hidden: torch.Tensor, o_outputs: list[torch.Tensor]) -> torch.Tensor:
    """The residual stream where ``target``'s sub-layer output joins it: the block input for o_proj,
    that plus o_proj's output for down_proj (``plain_residual`` families)."""
    stream = hidden.float()
    return stream + o_outputs[0].float() if target.name == "down" and o_outputs else stream


def rectify_residual(adapter: ModelAdapter, subnet: Subnet, windows: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """The ``residual`` mode: :func:`rectify_sequential` with the residual stream's drift in the target."""
    if not adapter.plain_residual:
        raise UserError(f"the residual least-squares mode fits sub-layer outputs that join the residual stream as "
                        f"they are; {type(adapter).__name__} normalises them first: use the upstream mode")
    return rectify_sequential(adapter, subnet, windows, residual=True, **kwargs)


@contextmanager
def _layer_view(adapter: ModelAdapter, index: int, widths: LayerWidths, overrides: dict[str, torch.Tensor]):
    """The model with only layer ``index`` pruned (to ``widths``, with ``overrides``)."""
    layers = list(Subnet.dense(adapter.dims).layers)
    layers[index] = widths
    with subnet_view(adapter, Subnet(adapter.dims, layers), overrides):
        yield


@torch.no_grad()
def rectify_sequential(
    adapter: ModelAdapter,
    subnet: Subnet,
    windows: torch.Tensor,
    *,
    spec: ReformSpec,
    batch_size: int = 8,
    execution_device: torch.device | str | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    residual: bool = False,
) -> dict[str, torch.Tensor]:
    method = method_spec(spec.method)
    home = model_home(adapter)
    dense: BlockInputs = capture_block_inputs(adapter, windows, batch_size=batch_size,
                                              execution_device=execution_device)
    pruned = dense.with_hidden(list(dense.hidden))
    overrides: dict[str, torch.Tensor] = {}
    for layer, widths in progress(list(zip(adapter.layers, subnet.layers))):
        with block_on(layer.layer, execution_device):
            mine: dict[str, torch.Tensor] = {}
            targets = layer_targets(adapter, layer, widths)
            # the drift needs o_proj's output (taken outside the view, which may skip the attention)
            o_proj = layer.attention_output() if residual else None
            dense_out = [] if targets else run_block(layer.layer, dense)
            for target in targets:
                last = target is targets[-1]  # its dense pass runs the whole block: the next dense input
                stats = None
                for (dense_hidden, args, kwargs), pruned_hidden in zip(dense.calls(layer.layer), pruned.hidden):
                    with _outputs_of(o_proj) as dense_o:
                        x_dense, out = input_of(layer.layer, target.module, dense_hidden, args, kwargs, finish=last)
                    if last:
                        dense_out.append(out)
                    with _layer_view(adapter, layer.index, widths, mine), \
                            _outputs_of(o_proj) as pruned_o:
                        x_pruned, _ = input_of(layer.layer, target.module, pruned_hidden, args, kwargs)
                    if stats is None:
                        stats = PairedStats(x_pruned.shape[-1], x_dense.shape[-1], gram=method.gram,
                                            device=target.module.weight.device)
                    drift = (_stream(target, dense_hidden, dense_o) - _stream(target, pruned_hidden, pruned_o)
                             if residual else None)
                    stats.add(x_pruned, x_dense, drift)
                mine.update(target.overrides(method.solve(stats.problem(target), spec)))
            dense = dense.with_hidden(dense_out)
            with _layer_view(adapter, layer.index, widths, mine):
                pruned = pruned.with_hidden(run_block(layer.layer, pruned))
            overrides.update({k: v.to(home) for k, v in mine.items()})
    return overrides


def _with_dense(widths: LayerWidths, dims: ModelDims, name: str) -> LayerWidths:
    """``widths`` with the sub-layer of output projection ``name`` whole: its input then has every
    column X̂."""
    if name == "o":
        return LayerWidths(dims.num_kv_heads, dims.group_size, widths.channels)
    return LayerWidths(widths.kv_heads, widths.q_per_kv, dims.intermediate_size)


@torch.no_grad()
def _upstream_walk(adapter: ModelAdapter, subnet: Subnet, windows: torch.Tensor, *, spec: ReformSpec,
                   every_output: bool, batch_size: int, execution_device, progress,
                   orders: list[LayerOrder] | None = None):
    """Blocks in order on the model pruned to ``subnet`` and rectified so far (upstream mode): per
    layer, the statistics of its output projections' inputs, each taken with its own sub-layer whole
    (all of them with ``every_output``, else those ``subnet`` partly prunes), and the layer's
    rectified ``overrides``, attention first (the MLP's inputs see it rectified). The blocks run in
    ``spec.pass_dtype``; each solve reads the projection's weights as they are (float32). With
    ``spec.select == "obs"`` each projection's kept units are chosen again before its solve, the
    layer permuted and ``orders`` updated in place (reform/reselect.py). In a plain-residual family
    down_proj's pass, its sub-layer whole, also gives the block's outputs once it is refitted
    (the kept channels' inputs are a prefix of the pass's, space/residual_pass.py)."""
    method = method_spec(spec.method)
    dtype = getattr(torch, spec.pass_dtype)
    pruned = capture_block_inputs(adapter, windows, batch_size=batch_size,
                                  execution_device=execution_device).to(dtype=dtype)

    def view(index: int, widths: LayerWidths, mine: dict[str, torch.Tensor]):
        return _layer_view(adapter, index, widths, {k: v.to(dtype) for k, v in mine.items()})

    for layer, widths in progress(list(zip(adapter.layers, subnet.layers))):
        with block_on(layer.layer, execution_device):
            mine: dict[str, torch.Tensor] = {}
            targets = {t.name: t for t in layer_targets(adapter, layer, widths)}
            linears = layer.linears()
            stats: dict[str, InputStats] = {}
            passed = None  # down_proj's pass, when it also gives the block's outputs (space/residual_pass.py)
            for name in ("o", "down") if every_output else list(targets):
                with block_in(layer.layer, dtype), view(layer.index, _with_dense(widths, adapter.dims, name), mine):
                    if name == "down" and widths.channels:
                        passed = last_linear_pass(layer.layer, linears[name], pruned, gram=method.gram,
                                                  plain=adapter.plain_residual)
                        stats[name] = passed.stats
                    else:
                        stats[name] = linear_input_stats(layer.layer, linears[name], pruned, gram=method.gram)
                if name in targets:
                    target = targets[name]
                    if spec.select == "obs":
                        orders[layer.index] = reselect(layer, name, widths, stats[name], adapter.dims,
                                                       orders[layer.index], centred=spec.intercept,
                                                       held=None if passed is None else passed.inputs)
                    problem = target.local_problem(stats[name], centred=spec.intercept)
                    mine.update(target.overrides(method.solve(problem, spec)))
            with block_in(layer.layer, dtype), view(layer.index, widths, mine):
                outputs = run_block(layer.layer, pruned) if passed is None else passed.outputs(linears["down"])
            pruned = pruned.with_hidden(outputs)
            del passed
            yield layer, stats, mine


def rectify_upstream(
    adapter: ModelAdapter,
    subnet: Subnet,
    windows: torch.Tensor,
    *,
    spec: ReformSpec,
    batch_size: int = 8,
    execution_device: torch.device | str | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    orders: list[LayerOrder] | None = None,
) -> dict[str, torch.Tensor]:
    """The upstream mode; ``orders``: the model's layer orders, updated in place where ``spec.select``
    re-selects the kept units (the model's layers are permuted with them)."""
    if spec.select != "prefix" and orders is None:
        raise ValueError("re-selecting the kept units changes the layers' orders: pass them")
    home = model_home(adapter)
    overrides: dict[str, torch.Tensor] = {}
    for _, _, mine in _upstream_walk(adapter, subnet, windows, spec=spec, every_output=False, batch_size=batch_size,
                                     execution_device=execution_device, progress=progress, orders=orders):
        overrides.update({k: v.to(home) for k, v in mine.items()})
    return overrides


def upstream_stats(
    adapter: ModelAdapter,
    anchor: Subnet,
    windows: torch.Tensor,
    *,
    damping: float,
    pass_dtype: str = "float32",
    batch_size: int = 8,
    execution_device: torch.device | str | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Iterator[tuple[LayerAdapter, dict[str, InputStats]]]:
    """Per layer (streamed, in order), the statistics of the o_proj and down_proj inputs in the model
    pruned to ``anchor`` and rectified by upstream least squares (``damping``), each projection's
    own sub-layer whole: Týr-the-Pruner's statistics around one centre, the form of
    :func:`reform.local.output_stats` (prefix solvers built on them fit every width of a layer on
    the inputs an upstream model pruned like ``anchor`` gives it); the blocks run in ``pass_dtype``."""
    spec = ReformSpec("lstsq", "upstream", damping=damping, pass_dtype=pass_dtype)
    for layer, stats, _ in _upstream_walk(adapter, anchor, windows, spec=spec, every_output=True,
                                          batch_size=batch_size, execution_device=execution_device,
                                          progress=progress):
        yield layer, stats
