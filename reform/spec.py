"""What a reformation is: :class:`ReformSpec` (method, mode, settings) and the registry of
methods, each a function from one :class:`Problem` (an output projection, its kept columns, the
statistics of its inputs) to a :class:`Rectified` (new kept weights and/or a bias).

The drivers (reform/local.py, reform/sequential.py) gather the statistics, call a method, and turn
its result into ``overrides`` for :func:`space.views.subnet_view` and
:func:`space.export.export_subnet`; reform/rectify.py picks the driver of a mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from reform.admm import DEFAULT_ITERATIONS, DEFAULT_RHO, admm
from reform.bias import compensation_bias
from reform.lstsq import DEFAULT_DAMPING, RIDGES, PrefixLstsq
from space.errors import UserError

MODES = ("local", "sequential", "upstream", "residual")
# The dtypes the upstream mode's calibration passes may run in (statistics and solve stay float64/float32).
PASS_DTYPES = ("float32", "bfloat16")
# Which units a layer keeps: the prefix of the search's importance order, or (upstream mode) the
# units re-selected on the upstream statistics at the subnet's widths (reform/reselect.py).
SELECTIONS = ("prefix", "obs")
DEFAULT_METHOD = "lstsq"
# Local, measured on SmolLM2-135M (experiments/results/reform.md): the sequential fit reproduces the
# dense projection's output from the pruned stream's inputs, and over 30 pruned layers it chases
# errors it cannot express (WikiText-2 ppl at MLP 512/1536 everywhere: local 125, sequential 1166).
DEFAULT_MODE = "local"


@dataclass
class Problem:
    """One output projection to rectify.

    ``weight`` is the dense W (d_out x d_in) in importance order and ``kept`` its kept columns (a
    prefix width or indices). ``dense_mean`` (d_in) is the mean of the dense inputs, ``seen_mean``
    (|K|) that of the inputs the kept columns will see. ``gram`` and ``cross`` are as in
    :class:`~reform.lstsq.PrefixLstsq`: local mode, ``gram`` is the dense C (d_in x d_in) and
    ``cross`` None; sequential mode, ``gram`` is the pruned inputs' (|K| x |K|) and ``cross``
    ``X_prunedᵀ X_dense``; residual mode, also ``drift`` (``X_prunedᵀ D``, D the residual stream's
    drift, see reform/sequential.py). They are None for methods that do not need them.
    """

    weight: torch.Tensor
    kept: int | torch.Tensor
    dense_mean: torch.Tensor
    seen_mean: torch.Tensor
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    drift: torch.Tensor | None = None


@dataclass
class Rectified:
    weight: torch.Tensor | None = None  # the new kept columns (d_out x |K|)
    bias: torch.Tensor | None = None  # added to the projection's bias (d_out)


@dataclass(frozen=True)
class Method:
    name: str
    solve: Callable[[Problem, "ReformSpec"], Rectified] | None  # None: nothing to do
    gram: bool  # needs second moments (else means only)
    sequential: bool  # has a sequential form
    summary: str


METHODS: dict[str, Method] = {}


def register_method(name: str, *, gram: bool, sequential: bool, summary: str):
    def decorate(fn):
        METHODS[name] = Method(name, fn, gram, sequential, summary)
        return fn

    return decorate


def method_spec(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown reformation method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def take_columns(weight: torch.Tensor, kept: int | torch.Tensor) -> torch.Tensor:
    return weight[:, :kept] if isinstance(kept, int) else weight[:, kept.to(weight.device)]


METHODS["none"] = Method("none", None, gram=False, sequential=True, summary="no compensation")


@register_method("bias", gram=False, sequential=True, summary="FLAP: restore the output's mean with a bias")
def _bias(problem: Problem, spec: ReformSpec) -> Rectified:
    return Rectified(bias=compensation_bias(problem.weight, problem.kept, problem.dense_mean, problem.seen_mean))


@register_method("lstsq", gram=True, sequential=True, summary="closed-form least squares (Cholesky)")
def _lstsq(problem: Problem, spec: ReformSpec) -> Rectified:
    solver = PrefixLstsq(problem.weight, problem.gram, cross=problem.cross, drift=problem.drift,
                         damping=spec.damping, ridge=spec.ridge)
    weight = solver.solve(problem.kept if problem.cross is None else solver.width)
    if not spec.intercept:
        return Rectified(weight=weight)
    # ``problem.gram`` is then the centred moment (Target.local_problem): the weights fit the
    # deviations from the mean, and the bias restores the mean of the output
    return Rectified(weight=weight, bias=compensation_bias(problem.weight, problem.kept, problem.dense_mean,
                                                           problem.seen_mean, kept_weight=weight))


@register_method("admm", gram=True, sequential=False, summary="the paper's ADMM on the same problem")
def _admm(problem: Problem, spec: ReformSpec) -> Rectified:
    kept = problem.kept
    mask = torch.zeros(problem.weight.shape[1], dtype=torch.bool)
    mask[torch.arange(kept) if isinstance(kept, int) else kept.cpu()] = True
    full = admm(problem.weight, problem.gram, mask, rho=spec.rho, iterations=spec.iterations, damping=spec.damping)
    return Rectified(weight=take_columns(full, problem.kept))


@dataclass(frozen=True)
class ReformSpec:
    """Which method, in which mode, with which settings (recorded in every result)."""

    method: str = DEFAULT_METHOD
    mode: str = DEFAULT_MODE
    damping: float = DEFAULT_DAMPING
    rho: float = DEFAULT_RHO
    iterations: int = DEFAULT_ITERATIONS
    # upstream mode: the dtype the blocks run in while its statistics are gathered; the statistics
    # accumulate in float64 and the solve uses the float32 weights, so only the activations are rounded
    pass_dtype: str = "float32"
    select: str = "prefix"
    # what the least squares' ridge pulls toward: zero, or the dense kept weights (reform/lstsq.py)
    ridge: str = "zero"
    # local and upstream least squares with an intercept: fitted on the centred inputs, the output's
    # mean restored by a bias on o_proj/down_proj (the export then needs the per-layer config)
    intercept: bool = False

    def __post_init__(self):
        method = method_spec(self.method)
        if self.mode not in MODES:
            raise UserError(f"unknown reformation mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "sequential" and not method.sequential:
            raise UserError(f"method {self.method!r} has no sequential mode; use the local mode")
        if self.mode == "residual" and self.method not in ("lstsq", "none"):
            raise UserError(f"the residual mode targets the residual stream by least squares: method lstsq, "
                            f"not {self.method!r}")
        if self.damping < 0:
            raise UserError(f"damping must be >= 0, got {self.damping}")
        if self.pass_dtype not in PASS_DTYPES:
            raise UserError(f"unknown pass dtype {self.pass_dtype!r}; known: {', '.join(PASS_DTYPES)}")
        if self.pass_dtype != "float32" and self.mode != "upstream":
            raise UserError(f"only the upstream mode runs its calibration passes in {self.pass_dtype}, "
                            f"not the {self.mode} mode")
        if self.select not in SELECTIONS:
            raise UserError(f"unknown unit selection {self.select!r}; known: {', '.join(SELECTIONS)}")
        if self.select != "prefix" and (self.mode, self.method) != ("upstream", "lstsq"):
            raise UserError(f"units are re-selected on the upstream statistics for their least squares: mode "
                            f"upstream, method lstsq (not {self.mode}, {self.method})")
        if self.ridge not in RIDGES:
            raise UserError(f"unknown ridge {self.ridge!r}; known: {', '.join(RIDGES)}")
        if self.ridge != "zero" and (self.method != "lstsq" or self.mode not in ("local", "upstream")):
            raise UserError(f"a ridge toward the dense weights is the least squares' of the local and upstream "
                            f"modes (method lstsq), not {self.method} in the {self.mode} mode")
        if self.intercept and (self.method != "lstsq" or self.mode not in ("local", "upstream")):
            raise UserError(f"an intercept is the least squares' of the local and upstream modes (method lstsq), "
                            f"not {self.method} in the {self.mode} mode")
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
        for key, default in (("pass_dtype", "float32"), ("select", "prefix"), ("ridge", "zero"), ("intercept", False)):
            if data[key] == default:  # records written before the option read the same
                del data[key]
        return data
