"""Which output projections of a permuted layer get rectified, and how results become overrides.

Only o_proj and down_proj can be compensated (their removed input columns carried signal the
kept ones can re-express); a sub-layer is rectified when some but not all of its units are kept.
Keys are full state-dict keys (``model.layers.7.mlp.down_proj.weight``), the form
:func:`space.views.subnet_view` and :func:`space.export.export_subnet` take as ``overrides``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reform.spec import Problem, Rectified, take_columns
from space.adapters import LayerAdapter, ModelAdapter
from space.input_stats import InputStats
from space.views import kept_q, layer_prefix, module_names
from space.subnet import LayerWidths, ModelDims


@dataclass
class Target:
    name: str  # the adapter's short name: "o" or "down"
    module: nn.Linear
    kept: int | torch.Tensor  # kept input columns of the permuted layer: a prefix width or indices
    key: str  # state-dict name of the module

    def local_problem(self, stats: InputStats, *, centred: bool = False) -> Problem:
        """The problem of refitting the kept columns to this projection's own output on the inputs
        ``stats`` describes (all its input columns): the local mode's, and the upstream mode's.
        ``centred``: with the centred second moment (a least squares with an intercept)."""
        seen_mean = take_columns(stats.mean[None], self.kept)[0]
        gram = stats.centred_gram() if centred and stats.gram is not None else stats.gram
        return Problem(self.module.weight, self.kept, stats.mean, seen_mean, gram=gram)

    def overrides(self, rectified: Rectified) -> dict[str, torch.Tensor]:
        weight = self.module.weight
        out = {}
        if rectified.weight is not None:
            out[f"{self.key}.weight"] = rectified.weight.to(dtype=weight.dtype, device=weight.device)
        if rectified.bias is not None:
            bias = rectified.bias.to(dtype=weight.dtype, device=weight.device)
            out[f"{self.key}.bias"] = bias if self.module.bias is None else self.module.bias.detach() + bias
        return out


def o_columns(widths: LayerWidths, dims: ModelDims) -> int | torch.Tensor:
    """The kept o_proj columns: a prefix when whole groups are kept, else the same index set the
    prefix view gathers (``q_per_kv`` heads of each of the first ``kv_heads`` groups)."""
    if widths.q_per_kv == dims.group_size:
        return widths.heads * dims.head_dim
    columns = torch.arange(dims.num_heads * dims.head_dim)[None]
    return kept_q(columns, widths, dims, rows=False)[0]


def layer_targets(adapter: ModelAdapter, layer: LayerAdapter, widths: LayerWidths) -> list[Target]:
    """The partly pruned output projections of one layer, attention first (its rectification
    changes what the MLP sees in the sequential mode)."""
    dims = adapter.dims
    names = module_names(layer)
    prefix = layer_prefix(adapter, layer)
    targets = []
    if 0 < widths.heads < dims.num_heads:
        o = layer.attention_output()
        targets.append(Target("o", o, o_columns(widths, dims), prefix + names[o]))
    if 0 < widths.channels < dims.intermediate_size:
        down = layer.mlp_output()
        targets.append(Target("down", down, widths.channels, prefix + names[down]))
    return targets
