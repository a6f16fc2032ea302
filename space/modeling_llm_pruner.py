"""Modelling code of an llm-pruner export: the stock Hugging Face model with per-layer widths.

This file is copied verbatim into every exported folder (``modeling_llm_pruner.py``) and loaded
by ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. It depends only on
torch and transformers, and writes no forward code of its own: every decoder layer is the stock
decoder layer of the source family, built from that layer's own config.

The widths live in ``config.per_layer_config``, the upstream transformers shape for
heterogeneous models: ``{"07": {"num_attention_heads": 6, "num_key_value_heads": 2,
"intermediate_size": 512}, "12": {"num_attention_heads": 0, "num_key_value_heads": 0,
"skip": ["self_attn"]}}``. ``head_dim`` is pinned globally. A skipped sub-layer (all heads or
all channels removed) contributes nothing to the residual stream.
"""

from __future__ import annotations

import copy

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import Gemma2ForCausalLM
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.olmo2.modeling_olmo2 import Olmo2ForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

MODEL_TYPE_PREFIX = "llm_pruner_"


class SkippedAttention(nn.Module):
    """An attention sub-layer with no heads left: adds nothing to the residual stream.

    It still records one placeholder entry per token in the KV cache, because the cache's length
    bookkeeping (and so the positions of new tokens) is read from its layers.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # the name since transformers 5.24, and before
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """An MLP sub-layer with no channels left: adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


OUTPUT_BIAS_KEY = "llm_pruner_output_bias"


def build_decoder_layer(layer_class: type, layer_config, layer_idx: int, *, output_bias: bool = False) -> nn.Module:
    """The stock decoder layer at this layer's widths, with skipped sub-layers replaced, and with
    a bias on o_proj and down_proj when ``output_bias`` (bias compensation puts one there)."""
    skip = set(getattr(layer_config, "skip", None) or ())
    if skip:
        # Build the stock layer with a placeholder width for what will be replaced (no zero-size
        # modules: some families divide by the head count), then replace it.
        layer_config = copy.copy(layer_config)
        if "self_attn" in skip:
            layer_config.num_attention_heads = layer_config.num_key_value_heads = 1
        if "mlp" in skip:
            layer_config.intermediate_size = 1
    layer = layer_class(layer_config, layer_idx)
    if "self_attn" in skip:
        layer.self_attn = SkippedAttention(layer_idx)
    if "mlp" in skip:
        layer.mlp = SkippedMLP()
    if output_bias:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            linear = getattr(parent, name, None)
            if isinstance(linear, nn.Linear) and linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device))
    return layer


def _validate_per_layer_architecture(config) -> None:
    for idx, layer in enumerate(config.per_layer_config):
        heads, kv_heads = layer.num_attention_heads, layer.num_key_value_heads
        attention_skipped = "self_attn" in (getattr(layer, "skip", None) or ())
        if attention_skipped:
            continue
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise ValueError(
                f"layer {idx}: {heads} query heads cannot share {kv_heads} key/value heads evenly"
            )


def _pruned_classes(base_config: type, base_model: type) -> tuple[type, type]:
    """A config class and a causal-LM class for one stock family."""

    @strict
    class PrunedConfig(base_config):
        model_type = MODEL_TYPE_PREFIX + base_config.model_type

        def validate_architecture(self):
            # The stock check reads the global head count, which a heterogeneous config does
            # not have; check every layer instead.
            if self.is_heterogeneous:
                _validate_per_layer_architecture(self)
            else:
                super().validate_architecture()

    PrunedConfig.__name__ = PrunedConfig.__qualname__ = "Pruned" + base_config.__name__

    class PrunedForCausalLM(base_model):
        config_class = PrunedConfig

        def __init__(self, config):
            # The stock model is built without decoder layers (no dense weights are ever
            # allocated), then every layer is built at its own widths.
            num_layers = config.num_hidden_layers
            config.num_hidden_layers = 0
            try:
                super().__init__(config)
            finally:
                config.num_hidden_layers = num_layers
            layer_class = _decoder_layer_class(base_model)
            for idx in range(num_layers):
                layer = build_decoder_layer(
                    layer_class, config.per_layer_config[idx], idx,
                    output_bias=bool(getattr(config, OUTPUT_BIAS_KEY, False)),
                )
                if isinstance(getattr(layer, "self_attn", None), nn.Module) and hasattr(layer.self_attn, "config"):
                    # Share the global config so that attention-implementation switches reach it.
                    layer.self_attn.config = config
                self.model.layers.append(layer)
            self.post_init()

    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = "Pruned" + base_model.__name__
    return PrunedConfig, PrunedForCausalLM


def _decoder_layer_class(base_model: type) -> type:
    import sys

    module = sys.modules[base_model.__module__]
    name = base_model.__name__.replace("ForCausalLM", "DecoderLayer")
    return getattr(module, name)


PrunedLlamaConfig, PrunedLlamaForCausalLM = _pruned_classes(LlamaConfig, LlamaForCausalLM)
PrunedMistralConfig, PrunedMistralForCausalLM = _pruned_classes(MistralConfig, MistralForCausalLM)
PrunedQwen2Config, PrunedQwen2ForCausalLM = _pruned_classes(Qwen2Config, Qwen2ForCausalLM)
PrunedQwen3Config, PrunedQwen3ForCausalLM = _pruned_classes(Qwen3Config, Qwen3ForCausalLM)
PrunedOlmo2Config, PrunedOlmo2ForCausalLM = _pruned_classes(Olmo2Config, Olmo2ForCausalLM)
PrunedGemma2Config, PrunedGemma2ForCausalLM = _pruned_classes(Gemma2Config, Gemma2ForCausalLM)
PrunedGemma3TextConfig, PrunedGemma3ForCausalLM = _pruned_classes(Gemma3TextConfig, Gemma3ForCausalLM)

# stock model_type -> (config class, model class)
PRUNED_CLASSES = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "qwen3": (PrunedQwen3Config, PrunedQwen3ForCausalLM),
    "olmo2": (PrunedOlmo2Config, PrunedOlmo2ForCausalLM),
    "gemma2": (PrunedGemma2Config, PrunedGemma2ForCausalLM),
    "gemma3_text": (PrunedGemma3TextConfig, PrunedGemma3ForCausalLM),
}
