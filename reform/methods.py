"""The rectification methods, registered by name in one place.

A method takes one :class:`Problem` (an output projection, its kept columns, and the statistics
of its inputs) and returns a :class:`Rectified` (new kept weights and/or a bias). The drivers
(reform/local.py, reform/sequential.py) gather the statistics and turn the results into
``overrides`` for :func:`space.slicing.subnet_view` and :func:`space.export.export_subnet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from reform.admm import admm
from reform.bias import compensation_bias
from reform.lstsq import PrefixLstsq
from space.errors import UserError

if TYPE_CHECKING:
    from reform.rectify import ReformSpec


@dataclass
class Problem:
    """One output projection to rectify.

    ``weight`` is the dense W (d_out x d_in) in importance order and ``kept`` its kept columns (a
    prefix width or indices). ``dense_mean`` (d_in) is the mean of the dense inputs, ``seen_mean``
    (|K|) that of the inputs the kept columns will see. ``gram`` and ``cross`` are as in
    :class:`~reform.lstsq.PrefixLstsq`: local mode, ``gram`` is the dense C (d_in x d_in) and
    ``cross`` None; sequential mode, ``gram`` is the pruned inputs' (|K| x |K|) and ``cross``
    ``X_prunedᵀ X_dense``. Both are None for methods that do not need them.
    """

    weight: torch.Tensor
    kept: int | torch.Tensor
    dense_mean: torch.Tensor
    seen_mean: torch.Tensor
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None


@dataclass
class Rectified:
    weight: torch.Tensor | None = None  # the new kept columns (d_out x |K|)
    bias: torch.Tensor | None = None  # added to the projection's bias (d_out)


@dataclass(frozen=True)
class Method:
    name: str
    solve: Callable[[Problem, ReformSpec], Rectified] | None  # None: nothing to do
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
    solver = PrefixLstsq(problem.weight, problem.gram, cross=problem.cross, damping=spec.damping)
    return Rectified(weight=solver.solve(problem.kept if problem.cross is None else solver.width))


@register_method("admm", gram=True, sequential=False, summary="the paper's ADMM on the same problem")
def _admm(problem: Problem, spec: ReformSpec) -> Rectified:
    kept = problem.kept
    mask = torch.zeros(problem.weight.shape[1], dtype=torch.bool)
    mask[torch.arange(kept) if isinstance(kept, int) else kept.cpu()] = True
    full = admm(problem.weight, problem.gram, mask, rho=spec.rho, iterations=spec.iterations, damping=spec.damping)
    return Rectified(weight=take_columns(full, problem.kept))
