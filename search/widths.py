"""The search space as samplers see it: two integer parameters per layer.

``attn_07`` is the index of layer 7's attention shape among the allowed GQA-valid shapes, ordered
by head count (so that "larger index = more heads" and model-based samplers such as TPE, GP or
CMA-ES can exploit the order); ``mlp_07`` is its MLP width, on a grid anchored at the full width.
Every proposal is projected onto the budget before evaluation (:meth:`WidthSpace.repair`).

Presets of per-layer bounds:

* ``paper``: the official Search-LLM configuration for LLaMA-7B (MLP 768..11008 in steps of 512,
  at least 30 of 32 heads), scaled to the model: attention keeps at least 15/16 of its heads and
  the MLP at least 7 % of its channels.
* ``wide``: attention keeps at least half its heads, the MLP anything down to nothing.
* ``full``: any GQA-valid shape including no attention, any MLP width including none.
* ``depth``: every attention and MLP sub-layer whole or removed (EvoPress's depth search with
  ``--evolution staged``: its level switches drop one sub-layer and restore another of the same kind).
"""

from __future__ import annotations

from dataclasses import dataclass

from optuna.distributions import BaseDistribution, IntDistribution

from space.budget import Bounds, project
from space.subnet import LayerWidths, ModelDims, Subnet


@dataclass(frozen=True)
class Preset:
    min_heads_fraction: float  # of the layer's query heads; 0 allows an empty attention
    min_mlp_fraction: float
    allow_empty_mlp: bool
    depth: bool = False  # every sub-layer whole or gone


PRESETS = {
    "paper": Preset(min_heads_fraction=15 / 16, min_mlp_fraction=768 / 11008, allow_empty_mlp=False),
    "wide": Preset(min_heads_fraction=0.5, min_mlp_fraction=0.0, allow_empty_mlp=True),
    "full": Preset(min_heads_fraction=0.0, min_mlp_fraction=0.0, allow_empty_mlp=True),
    "depth": Preset(min_heads_fraction=0.0, min_mlp_fraction=0.0, allow_empty_mlp=True, depth=True),
}


def default_step(dims: ModelDims) -> int:
    """About 1/48 of the MLP width, rounded to a multiple of 8 (hardware-friendly widths)."""
    return max(8, int(round(dims.intermediate_size / 48 / 8)) * 8)


class WidthSpace:
    """Per-layer widths of one model under one preset and MLP step, and the budget."""

    def __init__(self, dims: ModelDims, *, preset: str = "wide", mlp_step: int | None = None):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        self.dims = dims
        self.preset = preset
        p = PRESETS[preset]
        step = dims.intermediate_size if p.depth else mlp_step or default_step(dims)
        low = int(p.min_mlp_fraction * dims.intermediate_size)
        shapes = [s for s in dims.attention_shapes()
                  if s[0] * s[1] >= p.min_heads_fraction * dims.num_heads - 1e-9]
        if p.depth:
            shapes = [(0, 0), (dims.num_kv_heads, dims.group_size)]
        self.bounds = Bounds(step=step, low=low, allow_empty_mlp=p.allow_empty_mlp, shapes=tuple(shapes))
        self.shapes = self.bounds.attention_shapes(dims)
        self.grid = self.bounds.channel_grid(dims)

    # --- Optuna -----------------------------------------------------------------------------

    def names(self, layer: int) -> tuple[str, str]:
        digits = len(str(self.dims.num_layers - 1))
        return f"attn_{layer:0{digits}d}", f"mlp_{layer:0{digits}d}"

    def distributions(self) -> dict[str, BaseDistribution]:
        out: dict[str, BaseDistribution] = {}
        for i in range(self.dims.num_layers):
            attn, mlp = self.names(i)
            out[attn] = IntDistribution(0, len(self.shapes) - 1)
            # Optuna grids start at `low`; ours is anchored at the full width, so the MLP
            # parameter is the grid index.
            out[mlp] = IntDistribution(0, len(self.grid) - 1)
        return out

    def decode(self, params: dict) -> Subnet:
        layers = []
        for i in range(self.dims.num_layers):
            attn, mlp = self.names(i)
            kv, q = self.shapes[params[attn]]
            layers.append(LayerWidths(kv, q, self.grid[params[mlp]]))
        return Subnet(self.dims, layers)

    def encode(self, subnet: Subnet) -> dict[str, int]:
        params = {}
        for i, w in enumerate(subnet.layers):
            attn, mlp = self.names(i)
            params[attn] = self.shapes.index((w.kv_heads, w.q_per_kv))
            params[mlp] = self.grid.index(w.channels)
        return params

    # --- the budget -------------------------------------------------------------------------

    def repair(self, subnet: Subnet, ratio: float) -> Subnet:
        """Project onto ``ratio`` inside this space's bounds."""
        return project(subnet, ratio=ratio, bounds=self.bounds)

    def contains(self, subnet: Subnet) -> bool:
        return all((w.kv_heads, w.q_per_kv) in self.shapes and w.channels in self.grid for w in subnet.layers)

    def describe(self) -> dict:
        return {"preset": self.preset, "mlp_step": self.bounds.step, "mlp_grid": [self.grid[0], self.grid[-1]],
                "attention_shapes": [list(s) for s in self.shapes]}
