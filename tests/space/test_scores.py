import pytest
import torch

from space.calibration import StatsRequest, capture_block_inputs, input_of, run_block, walk_layers
from space.input_stats import InputStats, bfloat16_products
from space.adapters import adapter_for
from space.errors import UserError
from space.scores import SCORES, compute_scores, score_spec
from space.scores.cache import ScoreCache, load_scores, save_scores


def hooked_inputs(model, token_ids, layer_index):
    """Inputs of o_proj and down_proj of one layer from an ordinary full forward pass."""
    layer = model.model.layers[layer_index]
    seen = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0].detach())),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0].detach())),
    ]
    with torch.no_grad():
        model(token_ids)
    for h in hooks:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in seen.items()}


def test_block_by_block_statistics_equal_a_full_forward(make_model, token_ids):
    model = make_model("llama")
    adapter = adapter_for(model)
    stats = list(walk_layers(adapter, token_ids, StatsRequest(("o", "down"), gram=("down",)), batch_size=3))
    assert [s.index for s in stats] == [0, 1, 2]
    x = hooked_inputs(model, token_ids, 2)
    down = stats[2].inputs["down"]
    assert down.count == x["down"].shape[0]
    torch.testing.assert_close(down.sum, x["down"].sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(down.gram, x["down"].T @ x["down"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[2].inputs["o"].variance, x["o"].var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def test_the_input_of_an_attention_projection_costs_no_mlp(make_model, token_ids):
    """``input_of`` stops the block at the linear (osscar's attention statistics run no MLP) and gives
    what a full pass feeds it; with ``finish`` the block runs whole and gives its output too."""
    adapter = adapter_for(make_model("llama"))
    layer = adapter.layers[0]
    inputs = capture_block_inputs(adapter, token_ids, batch_size=len(token_ids))
    (hidden, args, kwargs), = inputs.calls(layer.layer)
    mlp_calls = []
    handle = layer.mlp_output().register_forward_pre_hook(lambda module, inputs: mlp_calls.append(1))
    try:
        x, none = input_of(layer.layer, layer.attention_output(), hidden, args, kwargs)
        assert none is None and not mlp_calls
        y, out = input_of(layer.layer, layer.attention_output(), hidden, args, kwargs, finish=True)
        assert len(mlp_calls) == 1
    finally:
        handle.remove()
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(out, run_block(layer.layer, inputs)[0], rtol=0, atol=0)


def test_scores_follow_their_formulas(make_model, token_ids):
    model = make_model("llama")
    adapter = adapter_for(model)
    scores = compute_scores(adapter, token_ids, ["magnitude", "wanda-sp", "fluctuation"])
    x = hooked_inputs(model, token_ids, 1)
    down = model.model.layers[1].mlp.down_proj.weight.double()
    o = model.model.layers[1].self_attn.o_proj.weight.double()
    torch.testing.assert_close(scores["magnitude"][1].channels, down.norm(dim=0))
    torch.testing.assert_close(scores["magnitude"][1].heads, o.norm(dim=0).view(6, 8).sum(1))
    wanda = down.abs().mean(0) * x["down"].norm(dim=0)
    torch.testing.assert_close(scores["wanda-sp"][1].channels, wanda, rtol=1e-5, atol=1e-8)
    fluct = scores["fluctuation"][1].channels  # standardised per layer and module
    assert abs(float(fluct.mean())) < 1e-9 and abs(float(fluct.std()) - 1) < 1e-9
    raw = x["down"].var(0, unbiased=False) * down.square().sum(0)
    assert torch.equal(torch.argsort(fluct), torch.argsort(raw))


def test_groups_aggregate_their_heads(make_model, token_ids):
    model = make_model("llama")
    s = compute_scores(adapter_for(model), token_ids, ["wanda-sp"])["wanda-sp"][0]
    torch.testing.assert_close(s.groups, s.heads.view(2, 3).sum(1))


def test_obs_matches_its_definition_on_down_proj(make_model, token_ids):
    model = make_model("llama")
    adapter = adapter_for(model)
    obs = compute_scores(adapter, token_ids, ["obs"])["obs"][0]
    layer = model.model.layers[0]
    captured = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("down", a[0])),
             layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("gate", a[0]))]
    with torch.no_grad():
        model(token_ids)
    for h in hooks:
        h.remove()

    def inv_diag(x):
        x = x.reshape(-1, x.shape[-1]).double()
        h = 2 * x.T @ x
        h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        return torch.linalg.inv(h).diagonal()

    down, gate, up = (m.weight.double() for m in (layer.mlp.down_proj, layer.mlp.gate_proj, layer.mlp.up_proj))
    expected = (down.square() / inv_diag(captured["down"])).sum(0)
    expected += ((gate.square() + up.square()) / inv_diag(captured["gate"])).sum(1)
    torch.testing.assert_close(obs.channels, expected, rtol=1e-4, atol=1e-6)
    assert torch.all(obs.heads > 0) and torch.all(obs.groups > obs.heads.view(2, 3).sum(1))


def test_unknown_score_is_a_user_error():
    with pytest.raises(UserError, match="known: bip, block-influence, fluctuation, magnitude, newton, ntk, obs"):
        score_spec("entropy")


def test_every_score_declares_a_source():
    assert all(spec.source for spec in SCORES.values())


def test_score_cache_round_trip_and_invalidation(make_model, token_ids, tmp_path):
    scores = compute_scores(adapter_for(make_model("llama")), token_ids, ["wanda-sp"])
    path = tmp_path / "importance.pt"
    save_scores(path, scores, {"calibration": 1}, seconds=2.5)
    again, seconds = load_scores(path, {"calibration": 1})
    torch.testing.assert_close(again["wanda-sp"][2].channels, scores["wanda-sp"][2].channels)
    assert seconds == 2.5
    assert load_scores(path, {"calibration": 2}) is None


def test_score_cache_reuses_by_model_calibration_ratio_and_dtype(make_model, token_ids, tmp_path, monkeypatch):
    """One cache for every caller: memory first, then the shared folder; the key names the model
    file, the calibration, the ratio (for ratio-dependent scores), a non-float32 dtype and the
    score's version."""
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"weights")
    adapter = adapter_for(make_model("llama"))
    calls = []

    def windows():
        calls.append(1)
        return token_ids

    def scores(cache, **changes):
        options = dict(windows=windows, source=str(model_file), calibration={"seed": 0}, ratio=0.5)
        return cache.scores(adapter, ["newton"], **{**options, **changes})

    first = scores(ScoreCache())
    assert not first.reused and len(calls) == 1
    assert scores(ScoreCache()).reused and len(calls) == 1  # a new process: from the shared folder
    assert not scores(ScoreCache(), ratio=0.6).reused  # newton depends on the ratio
    assert not scores(ScoreCache(), calibration={"seed": 1}).reused
    adapter.model.to(torch.bfloat16)
    assert not scores(ScoreCache()).reused  # computed in another dtype
    adapter.model.to(torch.float32)
    import dataclasses

    from space.scores.base import SCORES

    monkeypatch.setitem(SCORES, "newton", dataclasses.replace(SCORES["newton"], version=2))
    assert not scores(ScoreCache()).reused  # a corrected formula: the old scores are not served
    monkeypatch.setitem(SCORES, "newton", dataclasses.replace(SCORES["newton"], version=1))
    model_file.write_bytes(b"other weights")  # the file changed: its fingerprint too
    assert not scores(ScoreCache()).reused
    memory_only = ScoreCache()
    assert not scores(memory_only, source=None).reused and scores(memory_only, source=None).reused
    assert not scores(ScoreCache(), source=None).reused  # nothing on disk for a model without a file


@pytest.mark.parametrize("gram", [False, True])
def test_input_stats_accumulate_in_float64(gram):
    stats = InputStats(3, gram=gram, device=torch.device("cpu"))
    x = torch.tensor([[1e4, 1.0, -2.0], [1e4 + 1, 3.0, 2.0]])
    stats.add(x[:1])
    stats.add(x[1:])
    assert stats.sum.dtype == torch.float64
    # (1e4 + 1)² is not a float32: the variance of [1e4, 1e4 + 1] survives only through the shift
    torch.testing.assert_close(stats.variance, torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64))


def test_input_stats_equal_float64_sums_of_every_batch():
    """The shifted float32 sums give back the float64 sums, the mean and the norm; the columns
    reordered with them."""
    torch.manual_seed(0)
    batches = [torch.randn(64, 5, dtype=torch.float64) * 3 + torch.arange(5.0).double() * 100 for _ in range(3)]
    stats = InputStats(5, gram=True, device=torch.device("cpu"))
    for batch in batches:
        stats.add(batch.to(torch.bfloat16))
    x = torch.cat(batches).to(torch.bfloat16).double()
    torch.testing.assert_close(stats.sum, x.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.sumsq, x.square().sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.variance, x.var(0, unbiased=False), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-6, atol=1e-6)
    columns = torch.tensor([4, 2, 0, 1, 3])
    stats.reorder(columns)
    torch.testing.assert_close(stats.sumsq, x.square().sum(0)[columns], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.mean, x.mean(0)[columns], rtol=1e-6, atol=1e-6)


def test_bfloat16_products_keep_float32_precision_and_restore_the_setting():
    """oneDNN's bfloat16 path on bfloat16 values accumulates in float32 (where the CPU has no bfloat16
    units it is the float32 product); the setting is the caller's again afterwards, also after an error."""
    torch.manual_seed(0)
    x = (torch.randn(512, 96) * torch.rand(96) * 10).to(torch.bfloat16)
    exact = x.double().T @ x.double()
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError), bfloat16_products(True):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        product = x.float().T @ x.float()
        raise RuntimeError
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert float((product.double() - exact).abs().max() / exact.abs().max()) < 1e-5
    stats = InputStats(96, gram=True, device=torch.device("cpu"))
    stats.add(x)
    torch.testing.assert_close(stats.gram, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("name", ["wanda-sp", "osscar", "bip", "block-influence"])
def test_scores_computed_block_by_block_on_an_execution_device_are_the_same(make_model, token_ids, name):
    """The streamed preparation's path (each block moved to the execution device for its turn) gives
    the scores of the ordinary one; on a CPU-only machine the moves are no-ops but the path runs."""
    adapter = adapter_for(make_model("llama"))
    plain = compute_scores(adapter, token_ids, [name], ratio=0.5)[name]
    streamed = compute_scores(adapter, token_ids, [name], ratio=0.5, execution_device="cpu")[name]
    for a, b in zip(plain, streamed):
        for x, y in ((a.heads, b.heads), (a.groups, b.groups), (a.channels, b.channels)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_in_host_memory_is_prepared_on_the_gpu_block_by_block(make_model, token_ids):
    from reform.local import output_solvers

    model = make_model("llama")
    adapter = adapter_for(model)
    streamed = compute_scores(adapter, token_ids, ["wanda-sp", "osscar"], ratio=0.5, execution_device="cuda")
    solvers = output_solvers(adapter, token_ids, precompute=torch.float32, execution_device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())  # every block went back
    assert solvers[0]["down"].solve(40).device.type == "cpu" and solvers[0]["down"].state_bytes() > 0
    model.cuda()
    on_gpu = compute_scores(adapter, token_ids, ["wanda-sp", "osscar"], ratio=0.5)
    for name in on_gpu:
        for a, b in zip(streamed[name], on_gpu[name]):
            torch.testing.assert_close(a.channels, b.channels, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["wanda-sp", "osscar"])
def test_scores_in_a_bfloat16_pass_dtype_round_only_the_passes(make_model, token_ids, name):
    """``pass_dtype``: the blocks run in bfloat16 for the statistics (osscar's refits and elimination
    read the float32 weights), every parameter is left bit for bit as it was, and the order keeps
    the float32 passes' heads and most of their channels at half width (this random model's
    near-ties aside: on SmolLM2, experiments/results/pass_dtype.md)."""
    adapter = adapter_for(make_model("llama"))
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    full = compute_scores(adapter, token_ids, [name], ratio=0.5)[name]
    half = compute_scores(adapter, token_ids, [name], ratio=0.5, pass_dtype=torch.bfloat16)[name]
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert any(not torch.equal(a.channels, b.channels) for a, b in zip(full, half))  # the passes did change

    def kept(scores: torch.Tensor) -> set[int]:
        return set(scores.argsort(descending=True)[:len(scores) // 2].tolist())

    for a, b in zip(full, half):
        assert kept(a.heads) == kept(b.heads)
        assert len(kept(a.channels) & kept(b.channels)) >= 0.8 * len(a.channels) // 2


def test_walk_layers_in_a_pass_dtype_gathers_float64_statistics_near_float32s(make_model, token_ids):
    adapter = adapter_for(make_model("llama"))
    request = StatsRequest(("o", "down"), gram=("down",))
    full = list(walk_layers(adapter, token_ids, request))
    half = list(walk_layers(adapter, token_ids, request, pass_dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())
    for a, b in zip(full, half):
        gram, rounded = a.inputs["down"].gram, b.inputs["down"].gram
        assert rounded.dtype == torch.float64 and not torch.equal(gram, rounded)
        assert float((gram - rounded).norm() / gram.norm()) < 0.02


def test_the_score_cache_keys_a_pass_dtype_only_for_scores_that_honour_it(make_model):
    from space.scores.cache import score_key

    for name, honours in (("wanda-sp", True), ("osscar", True), ("taylor", False), ("magnitude", False)):
        key = score_key([name], source=None, calibration=None, ratio=0.5, pass_dtype=torch.bfloat16)
        assert ("pass_dtype" in key) == honours, name
        assert "pass_dtype" not in score_key([name], source=None, calibration=None, ratio=0.5,
                                             pass_dtype=torch.float32)
