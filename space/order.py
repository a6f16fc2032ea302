"""Importance order: each layer's units sorted once, most important first.

Each layer is permuted once so that its units are in importance order: KV groups by group score,
and inside every group its query heads by head score; MLP channels by channel score. The
permutation is function-preserving (a head keeps its KV group; a channel keeps its rows and
column). Afterwards a subnet's widths say which units are kept: prefixes (:mod:`space.views`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from space.adapters import LayerAdapter, ModelAdapter
from space.scores.base import LayerScores, kept_heads
from space.subnet import LayerWidths, ModelDims


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
        # Stable descending sorts, so that ties keep the original order; the heads of the full shape
        # in the order kept_heads keeps them (groups, then heads within each group).
        heads = kept_heads(scores, dims, dims.num_kv_heads, dims.group_size).view(dims.num_kv_heads, dims.group_size)
        channels = torch.sort(scores.channels, descending=True, stable=True).indices
        return cls(heads[:, 0] // dims.group_size, heads, channels)

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


def orders_key(orders: list[LayerOrder]) -> str:
    """A digest of every layer's order: statistics taken in one order are valid only for it."""
    digest = hashlib.sha1()
    for order in orders:
        for t in (order.groups, order.heads, order.channels):
            digest.update(t.cpu().numpy().tobytes())
    return digest.hexdigest()


def expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row/column indices of whole units of ``size`` rows each."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


# --- permutation -----------------------------------------------------------------------------


@torch.no_grad()
def _take_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Reorder the rows (entries) of a linear's weight and bias, or of a norm's weight."""
    for param in module.parameters(recurse=False):
        param.data = param.data[rows.to(param.device)].contiguous()


@torch.no_grad()
def _take_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[:, columns.to(linear.weight.device)].contiguous()


@torch.no_grad()
def permute_layer(layer: LayerAdapter, order: LayerOrder, dims: ModelDims) -> None:
    """Reorder one dense layer's units in place; the layer computes the same function."""
    q, k, v = layer.attention_inputs()
    q_rows = expand(order.heads.reshape(-1), dims.head_dim)
    kv_rows = expand(order.groups, dims.head_dim)
    _take_rows(q, q_rows)
    _take_rows(k, kv_rows)
    _take_rows(v, kv_rows)
    for norm, rows in zip(layer.head_norms(), (q_rows, kv_rows)):
        if norm is not None:
            _take_rows(norm, rows)
    _take_columns(layer.attention_output(), q_rows)
    for linear in layer.mlp_inputs():
        _take_rows(linear, order.channels)
    _take_columns(layer.mlp_output(), order.channels)


def permute_model(adapter: ModelAdapter, orders: list[LayerOrder]) -> None:
    """Put every layer in importance order (do this once, on the dense model)."""
    for layer, order in zip(adapter.layers, orders):
        permute_layer(layer, order, adapter.dims)



def order_model(adapter: ModelAdapter, scores: list[LayerScores]) -> tuple[list[LayerOrder], list[LayerScores]]:
    """Permute every layer into the order of ``scores``; return the orders and sorted scores."""
    orders = [LayerOrder.from_scores(s, adapter.dims) for s in scores]
    permute_model(adapter, orders)
    return orders, [sorted_scores(s, o, adapter.dims) for s, o in zip(scores, orders)]


def orders_from_kept(kept: list[dict], dims: ModelDims) -> list[LayerOrder]:
    """Importance orders that reproduce an export's kept units (``subnet.json`` ``kept``): per
    layer the kept units first, in their recorded order, then the others in original order."""

    def kept_first(units: list[int], count: int) -> torch.Tensor:
        rest = sorted(set(range(count)) - set(units))
        return torch.tensor(list(units) + rest, dtype=torch.long)

    orders = []
    for layer in kept:
        groups = kept_first(layer["kv_heads"], dims.num_kv_heads)
        q_per_kv = len(layer["heads"]) // max(1, len(layer["kv_heads"]))
        heads = []
        for position, group in enumerate(groups.tolist()):
            base = group * dims.group_size
            own = layer["heads"][position * q_per_kv : (position + 1) * q_per_kv]  # empty past the kept groups
            heads.append(base + kept_first([h - base for h in own], dims.group_size))
        orders.append(LayerOrder(groups, torch.stack(heads), kept_first(layer["channels"], dims.intermediate_size)))
    return orders
