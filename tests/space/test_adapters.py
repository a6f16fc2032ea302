import pytest
import torch

from tests.conftest import FAMILIES
from space.adapters import adapter_for, family, supported_model_types
from space.errors import UserError


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_adapter_hands_back_the_real_modules(make_model, name):
    model = make_model(name)
    adapter = adapter_for(model)
    layer = model.model.layers[1]
    a = adapter.layers[1]
    assert a.attention_inputs() == [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    assert a.attention_output() is layer.self_attn.o_proj
    assert a.mlp_inputs() == [layer.mlp.gate_proj, layer.mlp.up_proj]
    assert a.mlp_output() is layer.mlp.down_proj
    dims = adapter.dims
    assert (dims.num_heads, dims.num_kv_heads, dims.group_size, dims.head_dim) == (6, 2, 3, 8)
    assert dims.num_layers == 3 and dims.intermediate_size == 96


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dense_counts_match_the_model(make_model, name):
    from space.subnet import Subnet

    model = make_model(name)
    dense = Subnet.dense(adapter_for(model).dims)
    linears = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    assert dense.block_params() == linears
    assert dense.total_params() == sum(p.numel() for p in model.parameters())


def test_families_declare_what_differs(make_model):
    assert adapter_for(make_model("qwen2")).dims.qkv_bias
    assert not adapter_for(make_model("llama")).dims.qkv_bias
    assert adapter_for(make_model("qwen3")).dims.attention_fixed == 2 * 8  # q_norm + k_norm over head_dim


def test_unknown_model_type_names_the_supported_ones(make_model):
    model = make_model("llama")
    model.config.model_type = "gpt_neox"
    with pytest.raises(UserError) as err:
        adapter_for(model)
    for name in supported_model_types():
        assert name in str(err.value)


def test_choice_is_by_model_type_not_name(make_model):
    model = make_model("mistral")
    model.config.name_or_path = "meta-llama/Llama-2-7b-hf"  # a misleading name changes nothing
    assert type(adapter_for(model)).__name__ == "MistralAdapter"
    assert family("llm_pruner_qwen3") == "qwen3"
