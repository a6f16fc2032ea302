"""What each family adds to the Llama layout, on tiny configs: Qwen2.5's q/k/v biases, OLMo-2's
q/k norms over all heads, Gemma's sliding-window layers, soft-capping and attention scale, the
calibration loop on layers called differently, generation from every export, and the families
that are refused (the shared checks, per family, are in test_adapters, test_order_and_views and
test_export)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from tests.conftest import FAMILIES, VOCAB, tiny_model
from space.adapters import adapter_for
from space.calibration import capture_block_inputs, run_block
from space.errors import UserError
from space.export import SUBNET_FILE, export_subnet
from space.order import order_model
from space.scores import compute_scores
from space.subnet import LayerWidths, Subnet
from space.unfuse import CONVERTED_FROM_KEY, unfused
from space.views import subnet_view

MIXED = [LayerWidths(1, 2, 50), LayerWidths(0, 0, 17), LayerWidths(2, 3, 0)]
UNIFORM = [LayerWidths(1, 2, 40)] * 3


def export(model, token_ids, layers, out_dir):
    adapter = adapter_for(model)
    orders, _ = order_model(adapter, compute_scores(adapter, token_ids, ["wanda-sp"])["wanda-sp"])
    subnet = Subnet(adapter.dims, layers)
    with subnet_view(adapter, subnet) as m:
        expected = m(token_ids).logits
    export_subnet(adapter, subnet, orders, out_dir)
    return expected


def greedy_without_cache(model, prompt, steps):
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return ids


LAYOUTS = {"mixed": MIXED, "skipped-first": [MIXED[1], MIXED[0], MIXED[2]], "uniform": UNIFORM}


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("layers, cache", [("mixed", "dynamic"), ("skipped-first", "dynamic"),
                                           ("skipped-first", "static"), ("uniform", "dynamic")])
def test_every_family_export_generates_with_the_cache(make_model, token_ids, tmp_path, name, layers, cache):
    """Prompt + new tokens (16) run past Gemma's sliding window (6): the cache of its sliding
    layers rolls, also where a sliding layer (the first) has no attention. Per-layer exports load
    with our modelling file, uniform ones as stock models."""
    export(make_model(name), token_ids, LAYOUTS[layers], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=layers != "uniform").eval()
    prompt = token_ids[:1, :8]
    generated = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                               cache_implementation=cache)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 8))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_calibration_loop_gives_every_block_its_own_call(make_model, token_ids, name):
    """Walking the blocks one by one reproduces the model's hidden states, also where layers get
    different masks and RoPE (Gemma's sliding-window and full-attention layers)."""
    model = make_model(name)
    adapter = adapter_for(model)
    hidden = model(token_ids, output_hidden_states=True).hidden_states
    inputs = capture_block_inputs(adapter, token_ids, batch_size=3)
    for layer in adapter.layers[:-1]:  # the last hidden state is after the final norm
        inputs = inputs.with_hidden(run_block(layer.layer, inputs))
        torch.testing.assert_close(torch.cat(inputs.hidden), hidden[layer.index + 1])
    if name.startswith("gemma"):
        assert inputs.block_kwargs  # the full-attention layer is called otherwise
    else:
        assert not inputs.block_kwargs
    assert all("forward" not in vars(layer.layer) for layer in adapter.layers)  # the recorders are gone


def test_qwen25_biases_go_with_their_heads(token_ids, tmp_path):
    """Qwen2.5 is ``qwen2``: q/k/v biases (and none on o), tied embeddings. The exported biases are
    the source's entries of the kept heads, in the source numbering that subnet.json records."""
    source = tiny_model("qwen2", tie_word_embeddings=True)
    dense = {k: v.clone() for k, v in source.state_dict().items()}
    assert adapter_for(source).dims.qkv_bias and not adapter_for(source).dims.o_bias
    expected = export(source, token_ids, MIXED, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert (reloaded(token_ids).logits - expected).abs().max() <= 1e-4
    kept = json.loads((tmp_path / "out" / SUBNET_FILE).read_text())["kept"][0]
    heads = torch.tensor(kept["heads"])
    groups = torch.tensor(kept["kv_heads"])
    attention = reloaded.model.layers[0].self_attn
    rows = lambda units: (units[:, None] * 8 + torch.arange(8)).reshape(-1)  # noqa: E731
    assert torch.equal(attention.q_proj.bias, dense["model.layers.0.self_attn.q_proj.bias"][rows(heads)])
    for name in ("k_proj", "v_proj"):
        assert torch.equal(getattr(attention, name).bias, dense[f"model.layers.0.self_attn.{name}.bias"][rows(groups)])


def test_olmo2_head_norms_are_sliced_with_the_heads(token_ids, tmp_path):
    source = tiny_model("olmo2")
    dims = adapter_for(source).dims
    assert dims.head_norms and dims.attention_fixed == 0
    dense_norm = source.model.layers[0].self_attn.q_norm.weight.detach().clone()
    export(source, token_ids, MIXED, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    attention = reloaded.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (2 * 8,) and attention.k_norm.weight.shape == (1 * 8,)
    heads = json.loads((tmp_path / "out" / SUBNET_FILE).read_text())["kept"][0]["heads"]
    assert torch.equal(attention.q_norm.weight, dense_norm.view(6, 8)[heads].reshape(-1))


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("layers", ["mixed", "uniform"])
def test_gemma_exports_keep_the_scale_the_caps_and_the_windows(token_ids, tmp_path, name, layers):
    """The attention scale comes from query_pre_attn_scalar (not head_dim, not the head count),
    and soft-capping, sliding windows, layer types and the embedding scale carry over, with tied
    embeddings as Gemma ships them."""
    source = tiny_model(name, tie_word_embeddings=True)
    expected = export(source, token_ids, MIXED if layers == "mixed" else UNIFORM, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=layers == "mixed").eval()
    assert (reloaded(token_ids).logits - expected).abs().max() <= 1e-4
    for key in ("query_pre_attn_scalar", "head_dim", "final_logit_softcapping", "attn_logit_softcapping",
                "sliding_window", "layer_types", "tie_word_embeddings"):
        assert getattr(reloaded.config, key, None) == getattr(source.config, key, None), key
    for i in (0, 2):  # layers with attention in both subnets
        mine, theirs = reloaded.model.layers[i].self_attn, source.model.layers[i].self_attn
        assert (mine.scaling, mine.sliding_window) == (theirs.scaling, theirs.sliding_window)
    assert reloaded.model.embed_tokens.scalar_embed_scale == source.model.embed_tokens.scalar_embed_scale


def tiny_phi3(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**{**values, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


LONGROPE = dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.2, 1.3],
                                     long_factor=[2.0, 2.5, 3.0, 3.5]),
                original_max_position_embeddings=16, max_position_embeddings=64)


@pytest.mark.parametrize("variant", ["plain", "sliding-window", "longrope"])
def test_phi3_unfused_is_mistral_with_the_same_logits(variant):
    overrides = {"plain": {}, "sliding-window": dict(sliding_window=6), "longrope": LONGROPE}[variant]
    phi3 = tiny_phi3(**overrides)
    mistral = unfused(phi3)
    assert type(mistral).__name__ == "MistralForCausalLM"
    assert getattr(mistral.config, CONVERTED_FROM_KEY) == "phi3"
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # past window and 16
    with torch.no_grad():
        assert torch.equal(mistral(ids).logits, phi3(ids).logits)
    assert unfused(mistral) is mistral
    adapter_for(mistral)  # prunable


def test_phi3_itself_is_refused_with_the_way_in():
    with pytest.raises(UserError, match="qkv_proj.*unfused") as err:
        adapter_for(tiny_phi3())
    assert "phi3" in str(err.value)


def test_phi3_with_partial_rotary_embeddings_is_refused():
    model = tiny_phi3(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75))
    with pytest.raises(UserError, match="partial rotary"):
        unfused(model)


def test_a_phi3_folder_loads_unfused_and_its_export_reloads(token_ids, tmp_path):
    from space.models import load_model
    from tests.conftest import tiny_tokenizer

    phi3 = tiny_phi3(sliding_window=6)
    phi3.save_pretrained(tmp_path / "phi3")
    tiny_tokenizer().save_pretrained(tmp_path / "phi3")
    loaded = load_model(str(tmp_path / "phi3"))
    assert type(loaded.model).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded.model(token_ids).logits, phi3(token_ids).logits)
    expected = export(loaded.model, token_ids, MIXED[:2], tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert getattr(reloaded.config, CONVERTED_FROM_KEY) == "phi3"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(token_ids).logits, expected, rtol=1e-4, atol=1e-4)
