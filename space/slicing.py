"""Importance order, prefix views, and physical slices.

Each layer is permuted once so that its units are in importance order: KV groups by group score,
and inside every group its query heads by head score; MLP channels by channel score. The
permutation is function-preserving (a head keeps its KV group; a channel keeps its rows and
column). Afterwards a subnet's widths say which units are kept: prefixes. A candidate is then
evaluated through views of the permuted weights (:func:`subnet_view`), without copying them,
and exported by copying only the kept slices (:func:`sliced_state_dict`).

One exception to "views": when a layer keeps fewer query heads per group than the model has
(``q_per_kv < group_size``), the kept q rows and o columns are not one strided block, and those
two matrices are gathered (copied) for the duration of the view.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from space.adapters import LayerAdapter, ModelAdapter
from space.importance import LayerScores
from space.modeling_llm_pruner import SkippedAttention, SkippedMLP
from space.subnet import LayerWidths, ModelDims, Subnet


@dataclass
class LayerOrder:
    """A layer's units in importance order, as indices into the original (dense) layer."""

    groups: torch.Tensor  # (num_kv_heads,) original KV group at each position
    heads: torch.Tensor  # (num_kv_heads, group_size) original head index at each (position, rank)
    channels: torch.Tensor  # (intermediate_size,) original channel at each position

    @classmethod
    def identity(cls, dims: ModelDims) -> "LayerOrder":
        heads = torch.arange(dims.num_heads).view(dims.num_kv_heads, dims.group_size)
        return cls(torch.arange(dims.num_kv_heads), heads, torch.arange(dims.intermediate_size))

    @classmethod
    def from_scores(cls, scores: LayerScores, dims: ModelDims) -> "LayerOrder":
        # Stable descending sorts, so that ties keep the original order.
        groups = torch.sort(scores.groups, descending=True, stable=True).indices
        head_scores = scores.heads.view(dims.num_kv_heads, dims.group_size)[groups]
        within = torch.sort(head_scores, descending=True, stable=True).indices
        heads = groups[:, None] * dims.group_size + within
        channels = torch.sort(scores.channels, descending=True, stable=True).indices
        return cls(groups, heads, channels)

    def compose(self, inner: "LayerOrder", dims: ModelDims) -> "LayerOrder":
        """The order ``inner`` (given relative to this order's positions) in original indices."""
        groups = self.groups[inner.groups]
        heads_by_position = self.heads.reshape(-1)[inner.heads.reshape(-1)].view_as(inner.heads)
        return LayerOrder(groups, heads_by_position, self.channels[inner.channels])

    def kept(self, widths: LayerWidths) -> dict[str, list[int]]:
        """Original indices of the units a prefix of ``widths`` keeps."""
        return {
            "kv_heads": self.groups[: widths.kv_heads].tolist(),
            "heads": self.heads[: widths.kv_heads, : widths.q_per_kv].reshape(-1).tolist(),
            "channels": self.channels[: widths.channels].tolist(),
        }

    def to_dict(self) -> dict:
        return {"groups": self.groups.tolist(), "heads": self.heads.tolist(), "channels": self.channels.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerOrder":
        return cls(torch.tensor(data["groups"]), torch.tensor(data["heads"]), torch.tensor(data["channels"]))


def sorted_scores(scores: LayerScores, order: LayerOrder, dims: ModelDims) -> LayerScores:
    """Scores rearranged into the order's positions (heads as (num_kv_heads, group_size) flat)."""
    return LayerScores(
        scores.heads[order.heads.reshape(-1)], scores.groups[order.groups], scores.channels[order.channels]
    )


# --- index helpers ---------------------------------------------------------------------------


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row/column indices of whole units of ``size`` rows each."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


def _q_rows(order: LayerOrder, head_dim: int) -> torch.Tensor:
    return _expand(order.heads.reshape(-1), head_dim)


# --- permutation -----------------------------------------------------------------------------


@torch.no_grad()
def _take_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[rows.to(linear.weight.device)].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[rows.to(linear.bias.device)].contiguous()


@torch.no_grad()
def _take_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[:, columns.to(linear.weight.device)].contiguous()


@torch.no_grad()
def permute_layer(layer: LayerAdapter, order: LayerOrder, dims: ModelDims) -> None:
    """Reorder one dense layer's units in place; the layer computes the same function."""
    q, k, v = layer.attention_inputs()
    q_rows = _q_rows(order, dims.head_dim)
    kv_rows = _expand(order.groups, dims.head_dim)
    _take_rows(q, q_rows)
    _take_rows(k, kv_rows)
    _take_rows(v, kv_rows)
    _take_columns(layer.attention_output(), q_rows)
    for linear in layer.mlp_inputs():
        _take_rows(linear, order.channels)
    _take_columns(layer.mlp_output(), order.channels)


def permute_model(adapter: ModelAdapter, orders: list[LayerOrder]) -> None:
    """Put every layer in importance order (do this once, on the dense model)."""
    for layer, order in zip(adapter.layers, orders):
        permute_layer(layer, order, adapter.dims)


# --- prefix views ----------------------------------------------------------------------------


def _kept_q(weight: torch.Tensor, widths: LayerWidths, dims: ModelDims, *, rows: bool) -> torch.Tensor:
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
    hd = dims.head_dim
    if widths.kv_heads:
        q, k, v = layer.attention_inputs()
        o = layer.attention_output()
        names = _module_names(layer)
        out[names[q] + ".weight"] = _kept_q(q.weight, widths, dims, rows=True)
        if q.bias is not None:
            out[names[q] + ".bias"] = _kept_q(q.bias[:, None], widths, dims, rows=True)[:, 0]
        for linear in (k, v):
            out[names[linear] + ".weight"] = linear.weight[: widths.kv_heads * hd]
            if linear.bias is not None:
                out[names[linear] + ".bias"] = linear.bias[: widths.kv_heads * hd]
        out[names[o] + ".weight"] = _kept_q(o.weight, widths, dims, rows=False)
        if o.bias is not None:
            out[names[o] + ".bias"] = o.bias
    if widths.channels:
        names = _module_names(layer)
        for linear in layer.mlp_inputs():
            out[names[linear] + ".weight"] = linear.weight[: widths.channels]
            if linear.bias is not None:
                out[names[linear] + ".bias"] = linear.bias[: widths.channels]
        down = layer.mlp_output()
        out[names[down] + ".weight"] = down.weight[:, : widths.channels]
        if down.bias is not None:
            out[names[down] + ".bias"] = down.bias
    return out


def _module_names(layer: LayerAdapter) -> dict[nn.Module, str]:
    return {module: name for name, module in layer.layer.named_modules()}


def layer_prefix(adapter: ModelAdapter, layer: LayerAdapter) -> str:
    """The state-dict prefix of a layer (``model.layers.7.``)."""
    return f"{_prefix_of(adapter.model, adapter.decoder_layers())}.{layer.index}."


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


# --- physical slices -------------------------------------------------------------------------


def sliced_state_dict(
    adapter: ModelAdapter,
    subnet: Subnet,
    *,
    overrides: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """The state dict of the pruned model: contiguous copies of the kept slices of every block
    (or their ``overrides``), and the rest of the model (embeddings, norms, head) as it is."""
    decoder_prefix = _prefix_of(adapter.model, adapter.decoder_layers())
    state: dict[str, torch.Tensor] = {}
    prunable = set()
    for layer, widths in zip(adapter.layers, subnet.layers):
        base = f"{decoder_prefix}.{layer.index}."
        for key, tensor in layer_tensors(layer, widths, adapter.dims).items():
            state[base + key] = tensor.detach().contiguous().clone()
        for name, module in layer.linears().items():
            prunable.update(f"{base}{_module_names(layer)[module]}.{p}" for p in ("weight", "bias"))
        if widths.kv_heads == 0:
            prunable.update(k for k in _sublayer_keys(adapter.model, base, layer.attention))
        if widths.channels == 0:
            prunable.update(k for k in _sublayer_keys(adapter.model, base, layer.mlp))
    for key, tensor in adapter.model.state_dict().items():
        if key not in prunable and key not in state:
            state[key] = tensor.detach()
    for key, tensor in (overrides or {}).items():
        state[key] = tensor.detach().contiguous().clone()
    if dtype is not None:
        state = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in state.items()}
    return state


def _prefix_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


def _sublayer_keys(model: nn.Module, base: str, sublayer: nn.Module) -> list[str]:
    name = _prefix_of(model, sublayer)
    return [f"{name}.{key}" for key in sublayer.state_dict()]
