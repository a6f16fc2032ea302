"""Rectification of the inherited weights: least squares, ADMM, bias compensation, and LoRA
recovery of an export.

The Python API: :func:`rectify` (the ``overrides`` of a subnet of a permuted model) with a
:class:`ReformSpec`; :func:`output_solvers` + :func:`solver_overrides` to rectify many subnets
from one calibration pass; :func:`recover_export` for LoRA recovery.
"""

from reform.local import output_solvers, output_stats, solver_overrides, stats_overrides
from reform.lora import LoraSpec, recover_export
from reform.lstsq import PrefixLstsq
from reform.rectify import rectify
from reform.spec import METHODS, ReformSpec, register_method

__all__ = ["METHODS", "LoraSpec", "PrefixLstsq", "ReformSpec", "output_solvers", "output_stats", "recover_export",
           "rectify", "register_method", "solver_overrides", "stats_overrides"]
