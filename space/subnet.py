"""Subnets: per-layer widths, their parameter and FLOP counts, and their JSON form.

Pure Python (no torch), so samplers and their tests run in milliseconds.

A layer's widths are ``(kv_heads, q_per_kv, channels)``: the kept KV groups, the query heads
kept in each kept group (the same for every group, so the layer stays a standard GQA layer),
and the kept MLP channels. Zero KV groups removes the attention sub-layer, zero channels the
MLP sub-layer. Because every layer is permuted into importance order once, the widths alone
say which units are kept: the first ``kv_heads`` groups, their first ``q_per_kv`` heads, and
the first ``channels`` channels.

The budget ``ratio`` is the kept fraction of block weights (q/k/v/o/gate/up/down of every
layer); embeddings, head, norms and biases are outside it (PROTOCOL.md). Projection onto a
budget is :mod:`space.budget`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelDims:
    """The shape of a dense model, as far as counting is concerned."""

    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    other_params: int = 0  # embeddings, head, norms: never pruned
    # Parameters outside the budget that still go with the units (for exact total counts):
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_fixed: int = 0  # per attention sub-layer whatever its width (e.g. q/k norms over head_dim)
    head_norms: bool = False  # q/k norms over all heads (OLMo-2): head_dim entries per kept q and KV head

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def attention_params(self, kv_heads: int, q_per_kv: int) -> int:
        return self.head_dim * self.hidden_size * 2 * kv_heads * (q_per_kv + 1)

    def mlp_params(self, channels: int) -> int:
        return 3 * self.hidden_size * channels

    def layer_params(self, widths: "LayerWidths") -> int:
        return self.attention_params(widths.kv_heads, widths.q_per_kv) + self.mlp_params(widths.channels)

    def layer_total_params(self, widths: "LayerWidths") -> int:
        """Every parameter of a layer's prunable sub-layers: weights, biases, per-head norms."""
        total = self.layer_params(widths)
        if widths.kv_heads:
            total += self.attention_fixed + self.o_bias * self.hidden_size
            total += self.qkv_bias * self.head_dim * (widths.heads + 2 * widths.kv_heads)
            total += self.head_norms * self.head_dim * (widths.heads + widths.kv_heads)
        if widths.channels:
            total += self.mlp_bias * (2 * widths.channels + self.hidden_size)
        return total

    def dense_layer(self) -> "LayerWidths":
        return LayerWidths(self.num_kv_heads, self.group_size, self.intermediate_size)

    def dense_block_params(self) -> int:
        return self.num_layers * self.layer_params(self.dense_layer())

    def attention_shapes(self) -> list[tuple[int, int]]:
        """Every GQA-valid ``(kv_heads, q_per_kv)``, ``(0, 0)`` included, by head count."""
        shapes = [(kv, q) for kv in range(1, self.num_kv_heads + 1) for q in range(1, self.group_size + 1)]
        return [(0, 0)] + sorted(shapes, key=lambda s: (s[0] * s[1], s[0]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerWidths:
    kv_heads: int
    q_per_kv: int
    channels: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.q_per_kv

    def check(self, dims: ModelDims, layer: int | None = None) -> None:
        where = f"layer {layer}: " if layer is not None else ""
        if not 0 <= self.kv_heads <= dims.num_kv_heads:
            raise ValueError(f"{where}kv_heads {self.kv_heads} outside [0, {dims.num_kv_heads}]")
        if (self.kv_heads == 0) != (self.q_per_kv == 0) or not 0 <= self.q_per_kv <= dims.group_size:
            raise ValueError(f"{where}q_per_kv {self.q_per_kv} invalid with kv_heads {self.kv_heads}")
        if not 0 <= self.channels <= dims.intermediate_size:
            raise ValueError(f"{where}channels {self.channels} outside [0, {dims.intermediate_size}]")


@dataclass(frozen=True)
class Subnet:
    dims: ModelDims
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != self.dims.num_layers:
            raise ValueError(f"{len(self.layers)} layer widths for a model of {self.dims.num_layers} layers")
        for i, widths in enumerate(self.layers):
            widths.check(self.dims, i)

    @classmethod
    def dense(cls, dims: ModelDims) -> "Subnet":
        return cls(dims, (dims.dense_layer(),) * dims.num_layers)

    # --- counting ---------------------------------------------------------------------------

    def block_params(self) -> int:
        return sum(self.dims.layer_params(w) for w in self.layers)

    def ratio(self) -> float:
        """Kept fraction of block weights."""
        return self.block_params() / self.dims.dense_block_params()

    def total_params(self) -> int:
        return sum(self.dims.layer_total_params(w) for w in self.layers) + self.dims.other_params

    def total_ratio(self) -> float:
        return self.total_params() / Subnet.dense(self.dims).total_params()

    def attention_ratio(self) -> float:
        dense = self.dims.attention_params(self.dims.num_kv_heads, self.dims.group_size) * self.dims.num_layers
        return sum(self.dims.attention_params(w.kv_heads, w.q_per_kv) for w in self.layers) / dense

    def mlp_ratio(self) -> float:
        return sum(w.channels for w in self.layers) / (self.dims.intermediate_size * self.dims.num_layers)

    def flops_per_token(self, seqlen: int) -> int:
        """Forward FLOPs per token of the decoder blocks for a causal window of ``seqlen``
        (2 per multiply-add; attention scores and values averaged over the causal positions)."""
        matmuls = 2 * self.block_params()
        attention = sum(4 * w.heads * self.dims.head_dim for w in self.layers) * (seqlen + 1) / 2
        return int(matmuls + attention)

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "dims": self.dims.to_dict(),
            "layers": [asdict(w) for w in self.layers],
            "block_params": self.block_params(),
            "ratio": self.ratio(),
            "total_params": self.total_params(),
            "total_ratio": self.total_ratio(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Subnet":
        return cls(ModelDims(**data["dims"]), tuple(LayerWidths(**w) for w in data["layers"]))
