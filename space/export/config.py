"""The config of an export: the source config, per-layer widths in the upstream
``per_layer_config`` field, ``head_dim`` pinned, and the pruned family's model type; or, when every
layer has the same widths, the family's own config with those widths (:func:`stock_config`: it loads
without remote code, in transformers, vLLM, llama.cpp's converter...)."""

from __future__ import annotations

import torch

from space.adapters import family
from space.errors import UserError
from space.modeling_llm_pruner import OUTPUT_BIAS_KEY, PRUNED_CLASSES
from space.subnet import Subnet


def per_layer_config(subnet: Subnet) -> dict[str, dict]:
    """The upstream ``per_layer_config`` of a subnet (every layer listed, zero-padded keys)."""
    digits = len(str(subnet.dims.num_layers - 1))
    result = {}
    for i, widths in enumerate(subnet.layers):
        entry = {
            "num_attention_heads": widths.heads,
            "num_key_value_heads": widths.kv_heads,
            "intermediate_size": widths.channels,
        }
        skip = [name for name, empty in (("self_attn", widths.kv_heads == 0), ("mlp", widths.channels == 0)) if empty]
        if skip:
            entry["skip"] = skip
        result[str(i).zfill(digits)] = entry
    return result


def _base_values(source_config, subnet: Subnet) -> tuple[str, dict]:
    base = family(source_config.model_type)
    if base not in PRUNED_CLASSES:
        raise UserError(f"cannot export model type {source_config.model_type!r}; supported: {', '.join(PRUNED_CLASSES)}")
    values = source_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "per_layer_config", "_name_or_path", "transformers_version",
                OUTPUT_BIAS_KEY):
        values.pop(key, None)
    values["head_dim"] = subnet.dims.head_dim
    return base, values


def is_uniform(subnet: Subnet) -> bool:
    """Every layer has the same widths, none of them empty: a stock config can say it."""
    first = subnet.layers[0]
    return first.heads > 0 and first.channels > 0 and all(w == first for w in subnet.layers)


def stock_config(source_config, subnet: Subnet, *, dtype: torch.dtype | None = None):
    """The family's own config (``LlamaConfig``...) for a uniform subnet (:func:`is_uniform`)."""
    from transformers import AutoConfig

    base, values = _base_values(source_config, subnet)
    widths = subnet.layers[0]
    values.update(num_attention_heads=widths.heads, num_key_value_heads=widths.kv_heads,
                  intermediate_size=widths.channels)
    if dtype is not None:
        values["dtype"] = str(dtype).removeprefix("torch.")
    return AutoConfig.for_model(base, **values)


def pruned_config(source_config, subnet: Subnet, *, dtype: torch.dtype | None = None, output_bias: bool = False):
    """The export's config: the source config, per-layer widths, ``head_dim`` pinned."""
    base, values = _base_values(source_config, subnet)
    config_class = PRUNED_CLASSES[base][0]
    values["per_layer_config"] = per_layer_config(subnet)
    if dtype is not None:
        values["dtype"] = str(dtype).removeprefix("torch.")
    if output_bias:
        values[OUTPUT_BIAS_KEY] = True
    return config_class(**values)
