"""Local rectification: every output projection is fitted on the dense model's own inputs.

One calibration pass over the dense (permuted) model, one block at a time: the statistics of a
layer's o_proj and down_proj inputs are solved and dropped before the next block runs, so peak
memory is one layer's statistics whatever the depth.

The same statistics, turned into one :class:`~reform.lstsq.PrefixLstsq` per projection and kept,
rectify any later subnet with triangular solves only (:func:`output_solvers`,
:func:`solver_overrides`): the search scores thousands of candidates after least squares this way.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from reform.lstsq import DEFAULT_DAMPING, PrefixLstsq
from reform.spec import Rectified, ReformSpec, method_spec
from reform.targets import layer_targets
from space.calibration import StatsRequest, walk_layers
from space.input_stats import InputStats
from space.adapters import LayerAdapter, ModelAdapter
from space.subnet import Subnet

OUTPUTS = ("o", "down")


def output_stats(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    *,
    gram: bool = True,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    execution_device: torch.device | str | None = None,
    pass_dtype: torch.dtype | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Iterator[tuple[LayerAdapter, dict[str, InputStats]]]:
    """Per layer (streamed, in order), the dense model's statistics of the o_proj and down_proj
    inputs (``"o"``, ``"down"``): mean, and with ``gram`` the float64 ``C = XᵀX``, in the
    layer's current (importance) order; ``pass_dtype``: the blocks run in it (None: the model's)."""
    request = StatsRequest(inputs=OUTPUTS, gram=OUTPUTS if gram else ())
    for stats in walk_layers(adapter, windows, request, batch_size=batch_size, layers=layers,
                             execution_device=execution_device, pass_dtype=pass_dtype, progress=progress):
        yield adapter.layers[stats.index], stats.inputs


def rectify_local(
    adapter: ModelAdapter,
    subnet: Subnet,
    windows: torch.Tensor,
    *,
    spec: ReformSpec,
    batch_size: int = 8,
    execution_device: torch.device | str | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> dict[str, torch.Tensor]:
    wanted = [layer.index for layer, w in zip(adapter.layers, subnet.layers) if layer_targets(adapter, layer, w)]
    if not wanted:
        return {}
    stats = output_stats(adapter, windows, gram=method_spec(spec.method).gram, layers=wanted,
                         batch_size=batch_size, execution_device=execution_device, progress=progress)
    return stats_overrides(adapter, subnet, stats, spec=spec)


def stats_overrides(
    adapter: ModelAdapter,
    subnet: Subnet,
    stats: Iterable[tuple[LayerAdapter, dict[str, InputStats]]],
    *,
    spec: ReformSpec,
) -> dict[str, torch.Tensor]:
    """The ``overrides`` of ``subnet`` from dense statistics (streamed from :func:`output_stats`,
    or cached from it to rectify many subnets without another calibration pass)."""
    method = method_spec(spec.method)
    home = model_home(adapter)
    overrides: dict[str, torch.Tensor] = {}
    for layer, layer_stats in stats:
        for target in layer_targets(adapter, layer, subnet.layers[layer.index]):
            problem = target.local_problem(layer_stats[target.name], centred=spec.intercept)
            overrides.update({k: v.to(home) for k, v in target.overrides(method.solve(problem, spec)).items()})
    return overrides


def model_home(adapter: ModelAdapter) -> torch.device:
    """Where the model's weights live between blocks (its embeddings' device): rectified tensors
    solved on a GPU block by block go there, so a streamed model's overrides never pile up on it."""
    return adapter.embeddings().weight.device


def output_solvers(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    device: torch.device | str | None = None,
    precompute: torch.dtype | None = None,
    prefix_only: tuple[str, ...] = (),
    state_device: torch.device | str | None = None,
    execution_device: torch.device | str | None = None,
    pass_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    stats: Iterable[tuple[LayerAdapter, dict[str, InputStats]]] | None = None,
) -> list[dict[str, PrefixLstsq]]:
    """One prefix solver per layer and output projection (``{"o": ..., "down": ...}``), from one
    dense calibration pass; ``device``: where the factors are formed (default: the layer's).
    Each layer's gram is dropped once factored: what stays is the factor and ``C Wᵀ``,
    (d_in² + d_in·d_out) float64 per projection. ``precompute``: a dtype in which to keep
    ``L⁻¹`` and ``L⁻¹ C Wᵀ`` instead (and the factor and ``C Wᵀ`` in it too), making each prefix
    width one matrix product (:meth:`PrefixLstsq.precompute`; the search fitness uses float32)
    on ``state_device`` (default: where they were formed); the projections named in
    ``prefix_only`` keep only those (the fitness: ``down``, always a prefix). Layer by layer:
    the float64 state of one layer at a time, whatever the depth. ``execution_device``: each block
    runs there for its turn (:func:`space.calibration.walk_layers`), its solvers formed there, and
    in ``pass_dtype`` (None: the model's; the solvers read the float32 weights). ``stats``: the
    statistics to build from, in :func:`output_stats`' form (default: that, the dense model's;
    :func:`reform.sequential.upstream_stats` gives the pruned upstream model's)."""
    if stats is None:
        stats = output_stats(adapter, windows, batch_size=batch_size, execution_device=execution_device,
                             pass_dtype=pass_dtype, progress=progress)
    solvers = []
    for layer, layer_stats in stats:
        linears = layer.linears()
        layer_solvers = {
            name: PrefixLstsq(linears[name].weight, s.gram.to(device or s.gram.device), damping=damping)
            for name, s in layer_stats.items()
        }
        if precompute is not None:
            for name, solver in layer_solvers.items():
                solver.precompute(precompute, prefix_only=name in prefix_only, device=state_device)
        solvers.append(layer_solvers)
    return solvers


def solver_overrides(
    adapter: ModelAdapter, subnet: Subnet, solvers: list[dict[str, PrefixLstsq]]
) -> dict[str, torch.Tensor]:
    """The least-squares ``overrides`` of ``subnet`` from :func:`output_solvers`; equal to
    ``rectify(..., spec=ReformSpec("lstsq", "local"))`` on the same windows and damping."""
    overrides: dict[str, torch.Tensor] = {}
    for layer, widths, layer_solvers in zip(adapter.layers, subnet.layers, solvers):
        for target in layer_targets(adapter, layer, widths):
            overrides.update(target.overrides(Rectified(weight=layer_solvers[target.name].solve(target.kept))))
    return overrides
