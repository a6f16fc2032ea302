"""Prefix views: a subnet of a permuted model evaluated without copying its weights.

After :func:`space.order.permute_model`, a subnet's widths say which units are kept: the first
``kv_heads`` groups, their first ``q_per_kv`` heads, and the first ``channels`` channels. Inside
:func:`subnet_view` every prunable parameter is swapped for its kept prefix, a view of the
permuted weights.

One exception to "views": when a layer keeps fewer query heads per group than the model has
(``q_per_kv < group_size``), the kept q rows and o columns are not one strided block, and those
two matrices are gathered (copied) for the duration of the view.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from space.adapters import LayerAdapter, ModelAdapter
from space.modeling_llm_pruner import SkippedAttention, SkippedMLP
from space.subnet import LayerWidths, ModelDims, Subnet


def kept_q(weight: torch.Tensor, widths: LayerWidths, dims: ModelDims, *, rows: bool) -> torch.Tensor:
    """The kept query-head rows (q_proj) or columns (o_proj) of a permuted layer."""
    g, hd = dims.group_size, dims.head_dim
    n = widths.kv_heads * widths.q_per_kv * hd
    if widths.q_per_kv == g:  # whole groups: a prefix, a true view
        return weight[:n] if rows else weight[:, :n]
    if rows:
        return weight.view(dims.num_kv_heads, g, hd, -1)[: widths.kv_heads, : widths.q_per_kv].reshape(n, -1)
    return weight.view(weight.shape[0], dims.num_kv_heads, g, hd)[:, : widths.kv_heads, : widths.q_per_kv].reshape(
        weight.shape[0], n
    )


def layer_tensors(layer: LayerAdapter, widths: LayerWidths, dims: ModelDims) -> dict[str, torch.Tensor]:
    """The kept part of every prunable tensor of a permuted layer, keyed like its state dict
    (``self_attn.q_proj.weight``...); views wherever the layout allows."""
    out: dict[str, torch.Tensor] = {}
    names = module_names(layer)
    if widths.kv_heads:
        q, k, v = layer.attention_inputs()
        q_norm, k_norm = layer.head_norms()
        kv_rows = widths.kv_heads * dims.head_dim
        for module, query in ((q, True), (k, False), (v, False), (q_norm, True), (k_norm, False)):
            for key, tensor in _own_tensors(module, names).items():
                if not query:
                    out[key] = tensor[:kv_rows]
                else:  # a weight (rows, in), or a bias or norm weight (rows,) taken as (rows, 1)
                    rows = kept_q(tensor.view(tensor.shape[0], -1), widths, dims, rows=True)
                    out[key] = rows.view(-1, *tensor.shape[1:])
        o = layer.attention_output()
        out[names[o] + ".weight"] = kept_q(o.weight, widths, dims, rows=False)
        if o.bias is not None:
            out[names[o] + ".bias"] = o.bias
    if widths.channels:
        for linear in layer.mlp_inputs():
            for key, tensor in _own_tensors(linear, names).items():
                out[key] = tensor[: widths.channels]
        down = layer.mlp_output()
        out[names[down] + ".weight"] = down.weight[:, : widths.channels]
        if down.bias is not None:
            out[names[down] + ".bias"] = down.bias
    return out


def _own_tensors(module: nn.Module | None, names: dict[nn.Module, str]) -> dict[str, torch.Tensor]:
    """A module's own parameters (weight, bias...) by state-dict key; none for ``None``."""
    if module is None:
        return {}
    return {f"{names[module]}.{name}": p for name, p in module.named_parameters(recurse=False)}


def module_names(layer: LayerAdapter) -> dict[nn.Module, str]:
    return {module: name for name, module in layer.layer.named_modules()}


def layer_prefix(adapter: ModelAdapter, layer: LayerAdapter) -> str:
    """The state-dict prefix of a layer (``model.layers.7.``)."""
    return f"{module_path(adapter.model, adapter.decoder_layers())}.{layer.index}."


@contextmanager
def subnet_view(adapter: ModelAdapter, subnet: Subnet, overrides: dict[str, torch.Tensor] | None = None):
    """Inside the block, the (permuted) model computes ``subnet``: every prunable parameter is
    swapped for its kept prefix (a view), sub-layers with no units left are swapped for empty
    ones, and the attention modules know their new group size. ``overrides`` (full state-dict
    keys, pruned shapes) replace kept slices or add parameters, e.g. rectified o_proj/down_proj
    weights and compensation biases. Everything is restored on exit."""
    dims = adapter.dims
    overrides = overrides or {}
    saved_params: list[tuple[nn.Module, str, nn.Parameter]] = []
    saved_modules: list[tuple[LayerAdapter, str, nn.Module]] = []
    saved_groups: list[tuple[nn.Module, int]] = []
    try:
        for layer, widths in zip(adapter.layers, subnet.layers):
            prefix = layer_prefix(adapter, layer)
            mine = {k[len(prefix):]: v for k, v in overrides.items() if k.startswith(prefix)}
            if widths == dims.dense_layer() and not mine:
                continue
            tensors = {**layer_tensors(layer, widths, dims), **mine}
            modules = dict(layer.layer.named_modules())
            for key, tensor in tensors.items():
                module_name, _, param_name = key.rpartition(".")
                module = modules[module_name]
                saved_params.append((module, param_name, module._parameters[param_name]))
                module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)
            if widths.kv_heads == 0:
                saved_modules.append((layer, "attention", layer.attention))
                layer.attention = SkippedAttention(layer.index)
            elif hasattr(layer.attention, "num_key_value_groups"):
                saved_groups.append((layer.attention, layer.attention.num_key_value_groups))
                layer.attention.num_key_value_groups = widths.q_per_kv
            if widths.channels == 0:
                saved_modules.append((layer, "mlp", layer.mlp))
                layer.mlp = SkippedMLP()
        yield adapter.model
    finally:
        for module, name, param in reversed(saved_params):
            module._parameters[name] = param
        for layer, attr, module in reversed(saved_modules):
            setattr(layer, attr, module)
        for attention, groups in saved_groups:
            attention.num_key_value_groups = groups



def module_path(model: nn.Module, target: nn.Module) -> str:
    """The dotted name of ``target`` inside ``model``."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")
