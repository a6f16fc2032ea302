from unittest import mock

import pytest
import torch

from reform.rectify import ReformSpec, rectify
from space.adapters import adapter_for
from space.calibration import block_in, capture_block_inputs, linear_input_stats, run_block
from space.residual_pass import attention_pass, last_linear_pass
from space.scores import osscar as osscar_module
from space.order import order_model
from space.scores import compute_scores
from space.subnet import LayerWidths, Subnet

PLAIN = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def refit_like(linear: torch.nn.Linear) -> None:
    """Change the weights as a refit would: some columns zeroed, the others moved."""
    with torch.no_grad():
        linear.weight.mul_(1 + 0.5 * torch.randn_like(linear.weight))
        linear.weight[:, ::3] = 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("family", PLAIN)
def test_one_pass_gives_the_block_outputs_after_its_last_linear_changes_bit_for_bit(make_model, token_ids, family,
                                                                                    dtype):
    adapter = adapter_for(make_model(family))
    assert adapter.plain_residual
    inputs = capture_block_inputs(adapter, token_ids, batch_size=3).to(dtype=dtype)
    layer = adapter.layers[1]
    down = layer.mlp_output()
    with block_in(layer.layer, dtype):
        passed = last_linear_pass(layer.layer, down, inputs, gram=True, plain=True)
        stopped = linear_input_stats(layer.layer, down, inputs, gram=True)
    assert torch.equal(passed.stats.gram, stopped.gram) and passed.stats.count == stopped.count
    refit_like(down)
    with block_in(layer.layer, dtype):
        expected = run_block(layer.layer, inputs)
        got = passed.outputs(down)
    assert len(got) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_families_with_a_norm_after_the_mlp_are_not_plain_and_the_shortcut_would_be_wrong(make_model, token_ids,
                                                                                          family):
    adapter = adapter_for(make_model(family))
    assert not adapter.plain_residual
    inputs = capture_block_inputs(adapter, token_ids, batch_size=4)
    layer = adapter.layers[0]
    passed = last_linear_pass(layer.layer, layer.mlp_output(), inputs, gram=False, plain=True)  # forced
    refit_like(layer.mlp_output())
    assert not torch.allclose(passed.outputs(layer.mlp_output())[0], run_block(layer.layer, inputs)[0])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("family", PLAIN + ["gemma2", "olmo2", "gemma3_text"])
def test_the_attention_replayed_after_o_proj_changes_gives_the_blocks_own_passes_bit_for_bit(make_model, token_ids,
                                                                                             family, dtype):
    adapter = adapter_for(make_model(family))
    inputs = capture_block_inputs(adapter, token_ids, batch_size=3).to(dtype=dtype)
    layer = adapter.layers[1]  # Gemma: a full-attention layer after a sliding-window one
    o, down = layer.attention_output(), layer.mlp_output()
    with block_in(layer.layer, dtype):
        attention = attention_pass(layer.layer, layer.attention, o, inputs, gram=True)
        stopped = linear_input_stats(layer.layer, o, inputs, gram=True)
    assert torch.equal(attention.stats.gram, stopped.gram) and attention.stats.count == stopped.count
    refit_like(o)
    with block_in(layer.layer, dtype):
        expected = run_block(layer.layer, inputs)
        expected_down = linear_input_stats(layer.layer, down, inputs, gram=True)
        with attention.replayed():
            got = run_block(layer.layer, inputs)
        passed = last_linear_pass(layer.layer, down, inputs, gram=True, plain=adapter.plain_residual,
                                  attention=attention)
        refit_like(down)
        expected_after = run_block(layer.layer, inputs)
        got_after = passed.outputs(down)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(passed.stats.gram, expected_down.gram)
    assert all(torch.equal(a, b) for a, b in zip(got_after, expected_after))
    with block_in(layer.layer, dtype), pytest.raises(RuntimeError, match="more batches"), attention.replayed():
        run_block(layer.layer, inputs)
        run_block(layer.layer, inputs)  # one pass per replay: the second has no inputs left


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_osscar_order_with_the_attention_replayed_equals_the_attention_run_again(make_model, token_ids, family):
    adapter = adapter_for(make_model(family, layers=4))
    replayed = compute_scores(adapter, token_ids, ["osscar"], ratio=0.5)["osscar"]

    def without_replay(*args, attention, **kwargs):
        return last_linear_pass(*args, **kwargs)

    with mock.patch.object(osscar_module, "last_linear_pass", without_replay):
        again = compute_scores(adapter, token_ids, ["osscar"], ratio=0.5)["osscar"]
    for a, b in zip(replayed, again):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.channels, b.channels)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_osscar_order_from_one_pass_equals_the_block_run_again(make_model, token_ids, dtype):
    adapter = adapter_for(make_model("llama", layers=4))
    one_pass = compute_scores(adapter, token_ids, ["osscar"], ratio=0.5, pass_dtype=dtype)["osscar"]
    adapter.plain_residual = False  # the instance only: the order then runs the whole block after the refit
    again = compute_scores(adapter, token_ids, ["osscar"], ratio=0.5, pass_dtype=dtype)["osscar"]
    for a, b in zip(one_pass, again):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.channels, b.channels)


@pytest.mark.parametrize("select,pass_dtype", [("prefix", "float32"), ("obs", "float32"), ("prefix", "bfloat16")])
def test_the_upstream_walk_from_down_projs_pass_rectifies_as_the_block_run_again(make_model, select, pass_dtype):
    """The export's upstream mode takes each layer's outputs from down_proj's pass (its sub-layer whole,
    the kept channels a prefix of it, re-selected or not): the same overrides and orders as running the
    pruned block again. Layer 2 removes its attention, layer 1 keeps its MLP whole."""
    results = []
    for plain in (True, False):
        adapter = adapter_for(make_model("llama", seed=0))
        adapter.plain_residual = plain
        windows = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(5))
        orders, _ = order_model(adapter, compute_scores(adapter, windows, ["wanda-sp"])["wanda-sp"])
        subnet = Subnet(adapter.dims, [LayerWidths(2, 2, 40), LayerWidths(1, 3, 96), LayerWidths(0, 0, 50)])
        spec = ReformSpec("lstsq", "upstream", select=select, pass_dtype=pass_dtype)
        results.append((rectify(adapter, subnet, windows, spec=spec, orders=orders), orders))
    (one_pass, orders), (again, orders_again) = results
    assert one_pass.keys() == again.keys() and len(one_pass) == 4  # o and down of layer 0, o of layer 1, down of layer 2
    for key in one_pass:
        torch.testing.assert_close(one_pass[key], again[key], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a.channels, b.channels) and torch.equal(a.heads, b.heads) for a, b in zip(orders, orders_again))
