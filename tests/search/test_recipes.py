"""The seed systems as recipes: each recipe's defining property, its budget, and its export.

Tiny random 10-layer GQA models (2 KV groups of 3 heads, 96 channels) and the tiny WikiText-2
folder; every recipe's calibration is cut to a few short windows so that the file runs in tens of
seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_tokenizer, tiny_model
from search.oneshot import RECIPES, OneShotCache, prune, run_recipe
from space.adapters import adapter_for
from space.scores import ScoreContext, compute_scores
from space.models import LoadedModel, ModelSource
from space.scores.newton import newton_mask, objective
from space.views import subnet_view

LAYERS = 10
SMALL = {"seeds": 2, "subsets": 2, "trials": 4, "heldout": 2, "heldout_seqlen": 16}


def small(name: str, **selection):
    recipe = RECIPES[name].with_calibration(nsamples=min(RECIPES[name].calibration.nsamples, 4), seqlen=16)
    if recipe.selection:
        options = {**recipe.selection_options, **{k: v for k, v in SMALL.items() if k in recipe.selection_options},
                   **selection}
        recipe = dataclasses.replace(recipe, selection_options=options)
    return recipe


def loaded_tiny(seed: int = 0) -> LoadedModel:
    return LoadedModel(tiny_model("llama", layers=LAYERS, seed=seed), tiny_tokenizer(),
                       ModelSource("tiny", "memory", "tiny"))


def test_every_recipe_lands_on_its_budget_and_its_export_reloads(tiny_data, tmp_path, token_ids, monkeypatch):
    for name in RECIPES:
        monkeypatch.setitem(RECIPES, name, small(name))
        loaded = loaded_tiny()
        out = tmp_path / name
        pruned = prune(loaded, method=name, ratio=0.8, out=out)
        assert math.isclose(pruned.subnet.ratio(), 0.8, rel_tol=0.005), name
        with torch.no_grad(), subnet_view(pruned.adapter, pruned.subnet, pruned.overrides):
            expected = loaded.model(token_ids).logits
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(token_ids).logits, expected, rtol=1e-4, atol=1e-4, msg=name)
        layers = pruned.subnet.layers
        biases = any(k.endswith(".bias") for k in pruned.overrides)  # FLAP: every o/down gets one in the export
        extra = biases * 48 * (sum(w.kv_heads > 0 for w in layers) + sum(w.channels > 0 for w in layers))
        assert sum(p.numel() for p in model.parameters()) == pruned.subnet.total_params() + extra
        recorded = (out / "subnet.json").read_text()
        assert f'"method": "{name}"' in recorded and '"allocation"' in recorded


def test_llm_pruner_keeps_the_first_four_and_last_two_layers_whole(tiny_data):
    pruned = run_recipe(loaded_tiny(), small("llm-pruner"), ratio=0.75)
    dense = pruned.adapter.dims.dense_layer()
    layers = pruned.subnet.layers
    assert all(layers[i] == dense for i in (0, 1, 2, 3, LAYERS - 2, LAYERS - 1))
    inner = [w for w in layers[4:-2]]
    assert all(w != dense for w in inner)
    # the pruned layers pay for the whole budget: (0.75·10 − 6) / 4 of their weights
    kept = sum(pruned.adapter.dims.layer_params(w) for w in inner) / (4 * pruned.adapter.dims.layer_params(dense))
    assert kept == pytest.approx(0.375, rel=0.02)
    assert pruned.record["recipe"]["importance"] == "taylor"


def test_flap_bias_restores_the_mean_of_the_removed_columns(tiny_data):
    recipe = small("flap")
    loaded = loaded_tiny()
    pruned = run_recipe(loaded, recipe, ratio=0.7)
    windows = recipe.calibration.windows(loaded.tokenizer)
    layer_index = next(i for i, w in enumerate(pruned.subnet.layers) if 0 < w.channels < 96)
    down = pruned.adapter.layers[layer_index].mlp_output()
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 96)))
    with torch.no_grad():  # the permuted dense model: the same function, inputs in importance order
        loaded.model(windows)
    handle.remove()
    x = torch.cat(seen).double()
    kept = pruned.subnet.layers[layer_index].channels
    expected = down.weight.double()[:, kept:] @ x[:, kept:].mean(0)
    bias = pruned.overrides[f"model.layers.{layer_index}.mlp.down_proj.bias"]
    torch.testing.assert_close(bias.double(), expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-4  # a real correction, not zeros


def test_flap_bias_from_cached_statistics_equals_a_fresh_pass(tiny_data):
    """compare.py shares one cache across ratios: the second ratio reuses the dense means."""
    recipe, cache = small("flap"), OneShotCache()
    run_recipe(loaded_tiny(), recipe, ratio=0.8, cache=cache)
    cached = run_recipe(loaded_tiny(), recipe, ratio=0.6, cache=cache)
    fresh = run_recipe(loaded_tiny(), recipe, ratio=0.6)
    assert cached.record["seconds"]["reused_reform_stats"] > 0
    assert fresh.record["seconds"]["reused_reform_stats"] == 0
    assert cached.overrides.keys() == fresh.overrides.keys() and fresh.overrides
    for name, bias in fresh.overrides.items():
        torch.testing.assert_close(cached.overrides[name], bias, rtol=0, atol=0, msg=name)


def test_nirvana_removes_whole_kv_groups_and_keeps_the_lowest_kl_seed(tiny_data):
    pruned = run_recipe(loaded_tiny(), small("nirvana"), ratio=0.6)
    group = pruned.adapter.dims.group_size
    assert all(w.q_per_kv in (0, group) for w in pruned.subnet.layers)
    assert any(w.kv_heads < 2 for w in pruned.subnet.layers)  # some group did go
    selected = pruned.record["recipe"]["selected"]
    assert len(selected["tried"]) == 2
    best = min(selected["tried"], key=lambda t: t["kl"])
    assert pruned.record["recipe"]["calibration"]["seed"] == best["seed"]
    assert pruned.record["recipe"]["calibration"]["part"] == "first half"
    assert selected["heldout"]["part"] == "second half"


def test_newton_iteration_decreases_its_objective():
    torch.manual_seed(0)
    w, x = torch.randn(12, 20, dtype=torch.float64), torch.randn(200, 20, dtype=torch.float64) * torch.rand(20)
    a = (w.T @ w) * (x.T @ x)
    z, history = newton_mask(a, 8.0)
    assert all(b <= h + 1e-9 for h, b in zip(history, history[1:]))
    assert history[-1] < 0.5 * history[0]
    assert torch.all((z >= 0) & (z <= 1))
    assert objective(z, a, 8.0, float(a.diagonal().mean())) == pytest.approx(history[-1])
    assert abs(float(z.sum()) - 8.0) < abs(20 - 8.0)  # moved toward the kept count


def test_shortgpt_drops_exactly_the_lowest_influence_blocks(tiny_data):
    recipe = small("shortgpt")
    loaded = loaded_tiny()
    windows = recipe.calibration.windows(loaded.tokenizer)
    pairs = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: pairs.__setitem__(i, (args[0], out[0] if
                                                                                       isinstance(out, tuple) else out)))
             for i, layer in enumerate(loaded.model.model.layers)]
    with torch.no_grad():
        loaded.model(windows)
    for h in hooks:
        h.remove()
    influence = [1 - float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())
                 for a, b in (pairs[i] for i in range(LAYERS))]
    pruned = run_recipe(loaded, recipe, ratio=0.7)
    dropped = {i for i, w in enumerate(pruned.subnet.layers) if w.kv_heads == 0 and w.channels == 0}
    assert dropped == set(sorted(range(LAYERS), key=influence.__getitem__)[:3])
    assert all(w == pruned.adapter.dims.dense_layer() for i, w in enumerate(pruned.subnet.layers) if i not in dropped)


def test_adapruner_study_searches_calibration_subsets_and_metrics(tiny_data):
    pruned = run_recipe(loaded_tiny(), small("adapruner"), ratio=0.75)
    selected = pruned.record["recipe"]["selected"]
    trials = selected["trials"]
    assert len(trials) == 4
    assert all({"calibration_subset", "metric"} <= set(t) for t in trials)
    assert len({t["calibration_subset"] for t in trials}) > 1 or len({t["metric"] for t in trials}) > 1
    best = min(trials, key=lambda t: t["heldout_ppl"])
    assert selected["best"] == {"calibration_subset": best["calibration_subset"], "metric": best["metric"]}
    assert pruned.record["recipe"]["importance"] == best["metric"]
    assert pruned.record["recipe"]["calibration"]["seed"] == best["calibration_subset"]


def test_taylor_accumulated_over_checkpointed_micro_batches_equals_one_plain_backward(token_ids):
    model = tiny_model("llama", layers=2)
    adapter = adapter_for(model)
    scores = compute_scores(adapter, token_ids, ["taylor", "ntk"], batch_size=1)
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and not model.training  # restored
    model.zero_grad()
    logits = model(token_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), token_ids[:, 1:].reshape(-1))
    loss.backward()
    mlp = model.model.layers[1].mlp
    expected = sum((m.weight * m.weight.grad).abs().sum(d) for m, d in
                   ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0))).double()
    torch.testing.assert_close(scores["taylor"][1].channels, expected, rtol=1e-4, atol=1e-9)
    model.zero_grad()
    model(token_ids).logits.max(dim=1).values.mean().backward()
    attn = model.model.layers[0].self_attn
    ctx = ScoreContext(8, 3)
    q = (attn.q_proj.weight * attn.q_proj.weight.grad).abs().sum(1).view(-1, ctx.head_dim).sum(1)
    o = (attn.o_proj.weight * attn.o_proj.weight.grad).abs().sum(0).view(-1, ctx.head_dim).sum(1)
    kv = sum((m.weight * m.weight.grad).abs().sum(1).view(-1, ctx.head_dim).sum(1) for m in (attn.k_proj, attn.v_proj))
    torch.testing.assert_close(scores["ntk"][0].groups, ((q + o).view(2, 3).sum(1) + kv).double(), rtol=1e-4, atol=1e-9)


def test_lora_recovery_lowers_the_calibration_loss_and_keeps_the_export_format(tiny_data, tmp_path):
    from evaluators.data import CalibrationSpec
    from reform.lora import LoraSpec, recover_export

    out = tmp_path / "pruned"
    prune(loaded_tiny(), method="magnitude-sp", ratio=0.7, out=out)
    before = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).state_dict()
    calibration = CalibrationSpec("wikitext2", 8, 16, 0)
    recovery = recover_export(out, lora=LoraSpec(rank=4, lr=5e-3, epochs=3, batch_size=4), calibration=calibration,
                              out_dir=tmp_path / "recovered")
    assert recovery["epoch_losses"][-1] < recovery["epoch_losses"][0]
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered", trust_remote_code=True)
    after = recovered.state_dict()
    assert set(after) == set(before)  # merged: no adapter weights left, the same shapes
    assert any(not torch.equal(after[k], before[k]) for k in after if "q_proj" in k)
    record = (tmp_path / "recovered" / "subnet.json").read_text()
    assert '"recovery"' in record and '"split": "validation"' in record


def test_bip_channel_score_is_the_block_output_deviation_of_removing_it(token_ids):
    model = tiny_model("llama", layers=2)
    scores = compute_scores(adapter_for(model), token_ids, ["bip"])["bip"][1]
    layer = model.model.layers[1]
    outputs = {}
    handle = layer.register_forward_hook(lambda m, a, out: outputs.__setitem__("y", out[0] if isinstance(out, tuple)
                                                                               else out))
    with torch.no_grad():
        model(token_ids)
        dense = outputs["y"].double()
        for j in (0, 5, 17):
            column = layer.mlp.down_proj.weight[:, j].clone()
            layer.mlp.down_proj.weight[:, j] = 0
            model(token_ids)
            layer.mlp.down_proj.weight[:, j] = column
            deviation = (outputs["y"].double() - dense).norm() / dense.norm()
            assert float(scores.channels[j]) == pytest.approx(float(deviation), rel=1e-3)
    handle.remove()


def test_cli_prunes_with_a_method_and_recovers_the_export(tiny_model_dir, tiny_data, tmp_path, capsys):
    from search.cli import main

    out = tmp_path / "magnitude"
    assert main(["-q", "prune", "--model", str(tiny_model_dir), "--ratio", "0.7", "--method", "magnitude-sp",
                 "--out", str(out)]) == 0
    record = (out / "subnet.json").read_text()
    assert '"method": "magnitude-sp"' in record and '"allocation": "uniform"' in record
    assert main(["-q", "recover", str(out), "--out", str(tmp_path / "lora"), "--nsamples", "4", "--calib-seqlen", "16",
                 "--batch-size", "2"]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora", trust_remote_code=True)
    assert main(["-q", "prune", "--model", str(tiny_model_dir), "--ratio", "0.7", "--method", "sparsegpt",
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'sparsegpt'" in capsys.readouterr().err


def test_gradient_and_ratio_dependent_scores_work_in_a_custom_prune(tiny_model_dir, tiny_data, tmp_path):
    from search.cli import main

    for score in ("taylor", "newton"):
        out = tmp_path / score
        assert main(["-q", "prune", "--model", str(tiny_model_dir), "--ratio", "0.7", "--importance", score,
                     "--allocation", "global", "--reform", "none", "--nsamples", "4", "--calib-seqlen", "16",
                     "--out", str(out)]) == 0
        record = (out / "subnet.json").read_text()
        assert f'"importance": "{score}"' in record and '"split": "validation"' in record


def test_osscar_selects_on_upstream_statistics_and_exports_its_selection(tiny_data):
    recipe = small("osscar")
    loaded = loaded_tiny()
    windows = recipe.calibration.windows(loaded.tokenizer)
    adapter = adapter_for(loaded.model)
    dense = compute_scores(adapter, windows, ["obs-elimination"])["obs-elimination"]
    ours = compute_scores(adapter, windows, ["osscar"], ratio=0.6)["osscar"]
    # the pass restored the dense weights, and layer 0 sees the dense model's statistics
    torch.testing.assert_close(compute_scores(adapter, windows, ["obs-elimination"])["obs-elimination"][3].channels,
                               dense[3].channels, rtol=0, atol=0)
    torch.testing.assert_close(ours[0].heads, dense[0].heads)
    assert not torch.allclose(ours[1].heads, dense[1].heads)  # layer 1 sees the pruned layer 0
    pruned = run_recipe(loaded_tiny(), recipe, ratio=0.6)
    for scores, widths, order in zip(ours, pruned.subnet.layers, pruned.orders):
        selected = set(torch.nonzero(scores.channels >= 1).reshape(-1).tolist())
        assert abs(len(selected) - widths.channels) <= 2  # the provisional uniform width vs the allocation's
        kept = set(order.channels[: widths.channels].tolist())
        assert kept <= selected or selected <= kept
    assert pruned.record["recipe"]["reform"]["mode"] == "upstream"
