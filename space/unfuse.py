"""Families with fused projections, pruned through an exact conversion to an unfused family.

Phi-3 (model type ``phi3``: Phi-3, Phi-3.5-mini, Phi-4) is Mistral with q/k/v fused into one
``qkv_proj`` (rows: all query heads, then the KV heads' keys, then their values) and gate/up fused
into one ``gate_up_proj`` (gate rows, then up rows), and its attention splits ``qkv_proj`` by the
*model-wide* head counts, so a layer with fewer heads cannot run in Phi-3's own code. Splitting the
fused weights row for row gives a ``MistralForCausalLM`` that computes the same function (same
norms, RoPE parameters, sliding window, residual adds; Phi-3's dropouts are off in eval), whose
units the engine prunes like any other family's; exports are Mistral exports, which llama.cpp, vLLM
and transformers run without remote code. The one variant it cannot express is partial rotary
embeddings (Phi-4-mini's ``partial_rotary_factor`` 0.75): refused with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from space.errors import UserError

CONVERTED_FROM_KEY = "llm_pruner_converted_from"  # config.json of the conversion (and of its exports)


def is_fused(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "phi3"


def mistral_config(config):
    """The Mistral config of a Phi-3 config (UserError where Mistral cannot express it)."""
    from transformers import MistralConfig

    rope = dict(config.rope_parameters or {})
    if float(rope.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("model type 'phi3' with partial rotary embeddings (partial_rotary_factor "
                        f"{config.rope_parameters['partial_rotary_factor']}, e.g. Phi-4-mini) cannot be pruned: "
                        "its unfused form (Mistral) rotates whole heads")
    if rope.get("rope_type") == "longrope":
        rope.setdefault("original_max_position_embeddings", config.original_max_position_embeddings)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    values = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope, sliding_window=config.sliding_window,
        attention_dropout=config.attention_dropout, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, use_cache=config.use_cache,
    )
    out = MistralConfig(**values)
    setattr(out, CONVERTED_FROM_KEY, "phi3")
    return out


@torch.no_grad()
def unfused(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a Phi-3 model the ``MistralForCausalLM`` with the same function
    (same dtype and device; the fused weights are split, every other tensor is shared)."""
    if not is_fused(model):
        return model
    from transformers import MistralForCausalLM

    config = mistral_config(model.config)
    config._attn_implementation = model.config._attn_implementation
    parameter = next(model.parameters())
    with torch.device("meta"):
        out = MistralForCausalLM(config)
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            state |= {base + "q_proj.weight": q, base + "k_proj.weight": k, base + "v_proj.weight": v}
        elif name.endswith("mlp.gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2)
            state |= {base + "gate_proj.weight": gate, base + "up_proj.weight": up}
        else:
            state[name] = tensor
    out.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        out.tie_weights()
    # RoPE frequencies are buffers that no state dict carries: built again, on the weights' device
    with torch.device(parameter.device):
        out.model.rotary_emb = type(out.model.rotary_emb)(config=config)
    missing = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if missing:
        raise UserError(f"model type 'phi3': no weights for {', '.join(missing[:3])} in its conversion to Mistral")
    out.generation_config = model.generation_config
    out.train(model.training)
    return out
