"""Rectify a subnet's inherited weights: the entry point of ``reform/``.

Usage, on a model permuted into importance order (:func:`space.order.order_model`)::

    overrides = rectify(adapter, subnet, windows, spec=ReformSpec("lstsq", "local"))
    with subnet_view(adapter, subnet, overrides): ...          # evaluate
    export_subnet(adapter, subnet, orders, out, overrides=overrides)

``overrides`` maps full state-dict keys to tensors of the pruned shapes: rectified o_proj /
down_proj weights (``...o_proj.weight``, d_out x kept) and compensation biases (``...bias``).

Methods (reform/spec.py, one registry): ``none``, ``bias`` (FLAP), ``lstsq`` (closed form,
reform/lstsq.py), ``admm`` (reform/admm.py). Modes: ``local`` (reform/local.py: statistics of
the dense model's inputs, one pass), ``sequential`` (reform/sequential.py: inputs from the
pruned upstream model, targets from the dense one), ``upstream`` (the same file: inputs from
the pruned upstream model, the layer's own dense weights as target) and ``residual`` (the same
file: the sequential target plus the residual stream's drift, the dense block output as target).
Only partly pruned output projections are rectified; whole sub-layers and removed ones are left alone.
The upstream mode may also choose each layer's kept units again at the subnet's widths
(``ReformSpec(select="obs")``, reform/reselect.py): the layers are permuted and ``orders`` updated.

For a search that scores many subnets after least squares, build the solvers once and reuse
them (local mode; the model stays permuted and unchanged)::

    solvers = output_solvers(adapter, windows, damping=1e-4)    # list[{"o": PrefixLstsq, "down": ...}]
    for subnet in candidates:
        with subnet_view(adapter, subnet, solver_overrides(adapter, subnet, solvers)): ...

``PrefixLstsq.solve(k)`` costs two triangular solves with a k x k factor. The raw per-layer
statistics are streamed by :func:`output_stats` (``(layer, {"o": InputStats, "down": InputStats})``:
count, mean and float64 C of the dense o_proj / down_proj inputs, importance order); a cached list
of them rectifies any subnet with any local method through :func:`stats_overrides`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import torch

from reform.local import rectify_local
from reform.sequential import rectify_residual, rectify_sequential, rectify_upstream
from reform.spec import ReformSpec, method_spec
from reform.targets import layer_targets
from space.adapters import ModelAdapter
from space.order import LayerOrder
from space.subnet import Subnet

log = logging.getLogger(__name__)

DRIVERS = {"local": rectify_local, "sequential": rectify_sequential, "upstream": rectify_upstream,
           "residual": rectify_residual}


def rectify(
    adapter: ModelAdapter,
    subnet: Subnet,
    windows: torch.Tensor,
    *,
    spec: ReformSpec = ReformSpec(),
    batch_size: int = 8,
    execution_device: torch.device | str | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    orders: list[LayerOrder] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``overrides`` that rectify ``subnet`` of the permuted model, from calibration
    ``windows`` (n x seqlen token ids; a calibration split, never a test split).
    ``execution_device``: each block runs and is solved there for its turn, the model staying in
    host memory (:func:`space.calibration.walk_layers`); the overrides go where the model is.
    ``orders``: the model's layer orders, needed (and updated in place, the layers permuted with
    them) when ``spec.select`` re-selects the kept units."""
    if method_spec(spec.method).solve is None:
        return {}
    if not any(layer_targets(adapter, layer, widths) for layer, widths in zip(adapter.layers, subnet.layers)):
        return {}  # every sub-layer whole or removed (a dense or depth-pruned subnet): no calibration pass needed
    started = time.time()
    reselection = {"orders": orders} if spec.select != "prefix" else {}
    overrides = DRIVERS[spec.mode](adapter, subnet, windows, spec=spec, batch_size=batch_size,
                                   execution_device=execution_device, progress=progress, **reselection)
    log.info("reformation %s (%s) of %d tensors on %d x %d tokens: %.1f s", spec.method, spec.mode,
             len(overrides), *windows.shape, time.time() - started)
    return overrides
