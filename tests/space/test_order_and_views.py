import pytest
import torch

from tests.conftest import FAMILIES
from space.order import order_model
from space.adapters import adapter_for
from space.scores import compute_scores
from space.order import LayerOrder, sorted_scores
from space.views import layer_tensors, subnet_view
from space.subnet import LayerWidths, Subnet

SCORES = ["magnitude", "wanda-sp", "fluctuation", "obs"]


def permuted(model, token_ids, score="obs"):
    adapter = adapter_for(model)
    scores = compute_scores(adapter, token_ids, [score])[score]
    orders, ordered = order_model(adapter, scores)
    return adapter, orders, ordered


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads", [2, 6])
def test_permutation_keeps_the_logits(make_model, token_ids, name, kv_heads):
    model = make_model(name, kv_heads=kv_heads)
    before = model(token_ids).logits
    adapter, orders, _ = permuted(model, token_ids)
    assert any(not torch.equal(o.channels, torch.arange(96)) for o in orders)  # something moved
    torch.testing.assert_close(model(token_ids).logits, before, atol=1e-5, rtol=1e-5)


def test_orders_follow_the_scores(make_model, token_ids):
    model = make_model("llama")
    adapter = adapter_for(model)
    scores = compute_scores(adapter, token_ids, ["wanda-sp"])["wanda-sp"]
    order = LayerOrder.from_scores(scores[0], adapter.dims)
    s = sorted_scores(scores[0], order, adapter.dims)
    assert torch.all(s.channels[:-1] >= s.channels[1:])
    assert torch.all(s.groups[:-1] >= s.groups[1:])
    heads = s.heads.view(2, 3)
    assert torch.all(heads[:, :-1] >= heads[:, 1:])  # inside every group
    # every head stays in its own KV group
    assert torch.equal(order.heads // 3, order.groups[:, None].expand(2, 3))


def test_prefix_views_share_storage_with_the_model(make_model, token_ids):
    model = make_model("llama")
    adapter, _, _ = permuted(model, token_ids)
    dims = adapter.dims
    layer = adapter.layers[0]
    tensors = layer_tensors(layer, LayerWidths(1, 3, 40), dims)  # whole groups: every tensor a view
    originals = {name + ".weight": m.weight for name, m in layer.layer.named_modules() if isinstance(m, torch.nn.Linear)}
    for key, tensor in tensors.items():
        original = originals[key]
        assert tensor.untyped_storage().data_ptr() == original.untyped_storage().data_ptr(), key
    with subnet_view(adapter, Subnet(dims, [LayerWidths(1, 3, 40)] * 3)):
        for key, original in originals.items():
            module = dict(layer.layer.named_modules())[key.rsplit(".", 1)[0]]
            assert module.weight.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
            assert module.weight.numel() < original.numel()


def test_views_are_restored_exactly(make_model, token_ids):
    model = make_model("qwen2")
    adapter, _, _ = permuted(model, token_ids)
    before = {k: v for k, v in model.named_parameters()}
    modules = [(l.attention, l.mlp) for l in adapter.layers]
    reference = model(token_ids).logits
    subnet = Subnet(adapter.dims, [LayerWidths(0, 0, 10), LayerWidths(2, 1, 0), LayerWidths(1, 2, 96)])
    with subnet_view(adapter, subnet) as m:
        pruned = m(token_ids).logits
    assert not torch.allclose(pruned, reference)
    assert {k: v for k, v in model.named_parameters()}.keys() == before.keys()
    assert all(before[k] is v for k, v in model.named_parameters())
    assert modules == [(l.attention, l.mlp) for l in adapter.layers]
    torch.testing.assert_close(model(token_ids).logits, reference)


def test_dense_view_is_the_model(make_model, token_ids):
    model = make_model("llama")
    adapter, _, _ = permuted(model, token_ids)
    reference = model(token_ids).logits
    with subnet_view(adapter, Subnet.dense(adapter.dims)) as m:
        torch.testing.assert_close(m(token_ids).logits, reference)


def test_a_view_equals_removing_the_units_by_hand(make_model, token_ids):
    """One layer keeps 1 group of 2 heads and 10 channels: compare with masking those units."""
    model = make_model("llama", layers=1)
    adapter, _, _ = permuted(model, token_ids)
    subnet = Subnet(adapter.dims, [LayerWidths(1, 2, 10)])
    with subnet_view(adapter, subnet) as m:
        viewed = m(token_ids).logits
    layer = adapter.layers[0]
    with torch.no_grad():
        o = layer.attention_output().weight
        head_mask = torch.zeros(6, 8)
        head_mask[:2] = 1  # group 0, heads 0 and 1 (the first two of the first group)
        o.mul_(head_mask.view(1, -1))
        layer.mlp_output().weight[:, 10:] = 0
    torch.testing.assert_close(viewed, model(token_ids).logits, atol=1e-5, rtol=1e-5)
