import json
import random

import pytest

from space.budget import project

from space.subnet import LayerWidths, ModelDims, Subnet

SMOLLM2 = ModelDims(num_layers=30, hidden_size=576, head_dim=64, num_heads=9, num_kv_heads=3,
                    intermediate_size=1536, other_params=49152 * 576 + 61 * 576)  # tied embeddings + norms


def random_subnet(dims: ModelDims, rng: random.Random) -> Subnet:
    layers = []
    for _ in range(dims.num_layers):
        kv, q = rng.choice(dims.attention_shapes())
        layers.append(LayerWidths(kv, q, rng.randint(0, dims.intermediate_size)))
    return Subnet(dims, layers)


def test_smollm2_block_params_match_the_published_count():
    # 106.2 M of SmolLM2-135M's 134.5 M parameters are in the blocks (PROTOCOL.md).
    assert SMOLLM2.dense_block_params() == 106_168_320
    assert Subnet.dense(SMOLLM2).total_params() == 134_515_008


def test_attention_shapes_are_gqa_valid_and_complete():
    shapes = SMOLLM2.attention_shapes()
    assert shapes[0] == (0, 0)
    assert sorted({kv * q for kv, q in shapes}) == [0, 1, 2, 3, 4, 6, 9]
    assert all(1 <= q <= 3 and 1 <= kv <= 3 for kv, q in shapes[1:])


@pytest.mark.parametrize("seed", range(40))
def test_projection_lands_on_the_budget_for_random_proposals(seed):
    rng = random.Random(seed)
    ratio = rng.uniform(0.05, 1.0)
    step = rng.choice([1, 8, 64])
    result = project(random_subnet(SMOLLM2, rng), ratio=ratio, mlp_step=step)
    assert abs(result.ratio() - ratio) <= 0.005 * ratio
    assert all(w.channels % step == 0 or w.channels == SMOLLM2.intermediate_size for w in result.layers)


def test_projection_keeps_attention_when_the_mlp_can_absorb_the_difference():
    rng = random.Random(7)
    proposal = random_subnet(SMOLLM2, rng)
    attention = proposal.attention_ratio()
    target = proposal.ratio() * 0.9
    result = project(proposal, ratio=target)
    assert [(w.kv_heads, w.q_per_kv) for w in result.layers] == [(w.kv_heads, w.q_per_kv) for w in proposal.layers]
    assert result.attention_ratio() == attention
    # the MLP profile is scaled, not flattened: wider layers stay wider
    before = [w.channels for w in proposal.layers]
    after = [w.channels for w in result.layers]
    widest = max(range(30), key=before.__getitem__)
    narrowest = min(range(30), key=before.__getitem__)
    assert after[widest] >= after[narrowest]


def test_projection_shrinks_attention_only_when_it_must():
    dense = Subnet.dense(SMOLLM2)
    low = project(dense, ratio=0.15)  # attention alone is 25 % of the blocks
    assert low.attention_ratio() < 1.0
    assert abs(low.ratio() - 0.15) <= 0.005 * 0.15
    assert project(dense, ratio=0.5).attention_ratio() == 1.0


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_projection_rejects_ratios_outside_the_unit_interval(ratio):
    with pytest.raises(ValueError):
        project(Subnet.dense(SMOLLM2), ratio=ratio)


def test_invalid_widths_are_rejected():
    with pytest.raises(ValueError):
        Subnet(SMOLLM2, [LayerWidths(0, 2, 10)] * 30)  # heads without a KV group
    with pytest.raises(ValueError):
        Subnet(SMOLLM2, [LayerWidths(3, 4, 10)] * 30)  # more heads per group than the model has
    with pytest.raises(ValueError):
        Subnet(SMOLLM2, [LayerWidths(3, 3, 10)] * 29)


def test_json_round_trip():
    subnet = random_subnet(SMOLLM2, random.Random(3))
    data = json.loads(json.dumps(subnet.to_dict()))
    assert Subnet.from_dict(data) == subnet
    assert data["block_params"] == subnet.block_params() and data["ratio"] == subnet.ratio()


def test_flops_count_two_per_weight_plus_attention():
    dense = Subnet.dense(SMOLLM2)
    assert dense.flops_per_token(1) == 2 * dense.block_params() + 30 * 4 * 9 * 64
    half = project(dense, ratio=0.5)
    assert half.flops_per_token(2048) < dense.flops_per_token(2048)
