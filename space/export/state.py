"""The state dict of a pruned model: contiguous copies of the kept slices of every block."""

from __future__ import annotations

import torch
from torch import nn

from space.adapters import ModelAdapter
from space.subnet import Subnet
from space.views import layer_tensors, module_names, module_path


def sliced_state_dict(
    adapter: ModelAdapter,
    subnet: Subnet,
    *,
    overrides: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """The state dict of the pruned model: contiguous copies of the kept slices of every block
    (or their ``overrides``), and the rest of the model (embeddings, norms, head) as it is."""
    decoder_prefix = module_path(adapter.model, adapter.decoder_layers())
    state: dict[str, torch.Tensor] = {}
    prunable = set()
    for layer, widths in zip(adapter.layers, subnet.layers):
        base = f"{decoder_prefix}.{layer.index}."
        for key, tensor in layer_tensors(layer, widths, adapter.dims).items():
            state[base + key] = tensor.detach().contiguous().clone()
        for name, module in layer.linears().items():
            prunable.update(f"{base}{module_names(layer)[module]}.{p}" for p in ("weight", "bias"))
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



def _sublayer_keys(model: nn.Module, base: str, sublayer: nn.Module) -> list[str]:
    name = module_path(model, sublayer)
    return [f"{name}.{key}" for key in sublayer.state_dict()]
