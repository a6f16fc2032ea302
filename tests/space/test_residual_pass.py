import pytest
import torch

from space.adapters import adapter_for
from space.calibration import block_in, capture_block_inputs, linear_input_stats, run_block
from space.residual_pass import last_linear_pass
from space.scores import compute_scores

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
        passed = last_linear_pass(layer.layer, down, inputs, gram=True)
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
    passed = last_linear_pass(layer.layer, layer.mlp_output(), inputs, gram=False)
    refit_like(layer.mlp_output())
    assert not torch.allclose(passed.outputs(layer.mlp_output())[0], run_block(layer.layer, inputs)[0])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_osscar_order_from_one_pass_equals_the_block_run_again(make_model, token_ids, dtype):
    adapter = adapter_for(make_model("llama", layers=4))
    one_pass = compute_scores(adapter, token_ids, ["osscar"], ratio=0.5, pass_dtype=dtype)["osscar"]
    adapter.plain_residual = False  # the instance only: the order then runs the whole block after the refit
    again = compute_scores(adapter, token_ids, ["osscar"], ratio=0.5, pass_dtype=dtype)["osscar"]
    for a, b in zip(one_pass, again):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.channels, b.channels)
