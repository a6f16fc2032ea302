"""Rectify a subnet's inherited weights: the entry point of ``reform/``.

Usage, on a model permuted into importance order (:func:`search.oneshot.order_model`)::

    overrides = rectify(adapter, subnet, windows, spec=ReformSpec("lstsq", "local"))
    with subnet_view(adapter, subnet, overrides): ...          # evaluate
    export_subnet(adapter, subnet, orders, out, overrides=overrides)

``overrides`` maps full state-dict keys to tensors of the pruned shapes: rectified o_proj /
down_proj weights (``...o_proj.weight``, d_out x kept) and compensation biases (``...bias``).

Methods (reform/methods.py, one registry): ``none``, ``bias`` (FLAP), ``lstsq`` (closed form,
reform/lstsq.py), ``admm`` (reform/admm.py). Modes: ``local`` (reform/local.py: statistics of
the dense model's inputs, one pass) and ``sequential`` (reform/sequential.py: inputs from the
pruned upstream model, targets from the dense one). Only partly pruned output projections are
rectified; whole sub-layers and removed ones are left alone.

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
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from reform.admm import DEFAULT_ITERATIONS, DEFAULT_RHO
from reform.local import output_solvers, output_stats, rectify_local, solver_overrides, stats_overrides
from reform.lstsq import DEFAULT_DAMPING, PrefixLstsq
from reform.methods import METHODS, method_spec
from reform.sequential import rectify_sequential
from space.adapters import ModelAdapter
from space.errors import UserError
from space.subnet import Subnet

log = logging.getLogger(__name__)

DRIVERS = {"local": rectify_local, "sequential": rectify_sequential}
DEFAULT_METHOD = "lstsq"
# Local, measured on SmolLM2-135M (experiments/results/reform.md): the sequential fit reproduces the
# dense projection's output from the pruned stream's inputs, and over 30 pruned layers it chases
# errors it cannot express (WikiText-2 ppl at MLP 512/1536 everywhere: local 125, sequential 1166).
DEFAULT_MODE = "local"

__all__ = [
    "METHODS", "PrefixLstsq", "ReformSpec", "output_solvers", "output_stats", "rectify", "solver_overrides",
    "stats_overrides",
]


@dataclass(frozen=True)
class ReformSpec:
    """Which method, in which mode, with which settings (recorded in every result)."""

    method: str = DEFAULT_METHOD
    mode: str = DEFAULT_MODE
    damping: float = DEFAULT_DAMPING
    rho: float = DEFAULT_RHO
    iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self):
        method = method_spec(self.method)
        if self.mode not in DRIVERS:
            raise UserError(f"unknown reformation mode {self.mode!r}; known: {', '.join(DRIVERS)}")
        if self.mode == "sequential" and not method.sequential:
            raise UserError(f"method {self.method!r} has no sequential mode; use the local mode")
        if self.damping < 0:
            raise UserError(f"damping must be >= 0, got {self.damping}")
        if self.rho <= 0 or self.iterations < 1:
            raise UserError(f"ADMM needs rho > 0 and at least one iteration, got {self.rho}, {self.iterations}")

    def to_dict(self) -> dict:
        """The settings that matter for this method."""
        if method_spec(self.method).solve is None:
            return {"method": self.method}
        data = asdict(self)
        if self.method != "admm":
            del data["rho"], data["iterations"]
        if not method_spec(self.method).gram:
            del data["damping"]
        return data


def rectify(
    adapter: ModelAdapter,
    subnet: Subnet,
    windows: torch.Tensor,
    *,
    spec: ReformSpec = ReformSpec(),
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> dict[str, torch.Tensor]:
    """The ``overrides`` that rectify ``subnet`` of the permuted model, from calibration
    ``windows`` (n x seqlen token ids; a calibration split, never a test split)."""
    if method_spec(spec.method).solve is None:
        return {}
    started = time.time()
    overrides = DRIVERS[spec.mode](adapter, subnet, windows, spec=spec, batch_size=batch_size, progress=progress)
    log.info("reformation %s (%s) of %d tensors on %d x %d tokens: %.1f s", spec.method, spec.mode,
             len(overrides), *windows.shape, time.time() - started)
    return overrides
