"""The memory plan: the solver state it counts is the fitness's, every published config gets a plan
without weights, and a job that would not fit stops before it writes anything."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import search.plan as plan_module
from reform.local import output_solvers
from search.cli import main as cli
from search.config import SearchConfig
from search.job import run_search
from search.plan import config_dims, memory_plan, solver_bytes
from search.prepare import PREFIX_ONLY
from space.adapters import adapter_for
from space.errors import UserError
from tests.search.test_search import tiny_config

# beside the data folder ($LLM_PRUNER_DATA is shared/data), or beside this checkout
CONFIGS = next((p for p in (Path(os.environ.get("LLM_PRUNER_DATA", "../shared/data")).resolve().parent / "configs",
                            Path(__file__).resolve().parents[3] / "shared" / "configs") if p.is_dir()),
               Path("shared/configs"))


def test_the_planned_solver_state_is_what_the_fitness_holds(make_model, token_ids):
    adapter = adapter_for(make_model("llama"))
    full = output_solvers(adapter, token_ids, precompute=torch.float32)
    solvers = output_solvers(adapter, token_ids, precompute=torch.float32, prefix_only=PREFIX_ONLY)
    held = sum(s.state_bytes() for layer in solvers for s in layer.values())
    assert solver_bytes(adapter.dims) == pytest.approx(held, rel=0.05)
    halves = output_solvers(adapter, token_ids, precompute=torch.bfloat16, prefix_only=PREFIX_ONLY, state_device="cpu")
    assert solver_bytes(adapter.dims, 2) == pytest.approx(sum(s.state_bytes() for layer in halves
                                                               for s in layer.values()), rel=0.05)
    assert config_dims(adapter.model.config) == adapter.dims  # counted on a weightless copy
    for layer_full, layer in zip(full, solvers):  # the prefix-only form solves prefixes alike
        for width in (1, 17, 95):
            torch.testing.assert_close(layer["down"].solve(width), layer_full["down"].solve(width), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="prefix-only"):
        solvers[0]["down"].solve(torch.tensor([0, 5]))


@pytest.mark.skipif(not CONFIGS.is_dir(), reason="the shared configs are not next to this checkout")
@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b"])
def test_dry_run_plans_a_published_config_without_weights(name, tmp_path, capsys):
    status = cli(["-q", "search", "--model", str(CONFIGS / name), "--ratio", "0.5", "--run-dir", str(tmp_path / "r"),
                  "--dry-run", "--gpu-memory", "80", "--json", str(tmp_path / "plan.json")])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert status == 0 and "memory plan per worker" in capsys.readouterr().out
    assert {"weights_bytes", "fitness_bytes", "cache_bytes", "activation_bytes", "peak_bytes", "fits"} <= set(plan)
    assert plan["peak_bytes"] >= plan["weights_bytes"] + plan["fitness_bytes"] and not (tmp_path / "r").exists()


def test_a_kl_fitness_counts_its_dense_logits(make_model):
    dims = adapter_for(make_model("llama")).dims
    ppl = memory_plan(SearchConfig(model="m", ratio=0.5), dims, 128, memory=None)
    kl = memory_plan(SearchConfig(model="m", ratio=0.5, fitness="kl", fitness_top_k=16), dims, 128, memory=None)
    assert ppl["logits_bytes"] == 0 and kl["logits_bytes"] == 8 * 511 * (16 * 8 + 4)
    assert kl["peak_bytes"] - ppl["peak_bytes"] == kl["logits_bytes"] and ppl["fits"] is None


def test_a_job_that_would_not_fit_stops_before_writing(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "device_memory", lambda device, gb: 1000)
    with pytest.raises(UserError, match="needs about .* GB on cpu per worker"):
        run_search(tiny_config(tiny_model_dir), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_solver_state_on_the_host_or_in_bfloat16_scores_alike(make_model, token_ids):
    """``--solver-device cpu`` gives the same fitness values; bfloat16 state, close ones in the same order."""
    from search.fitness import Fitness
    from space.subnet import LayerWidths, Subnet

    adapter = adapter_for(make_model("llama"))
    subnets = [Subnet(adapter.dims, [LayerWidths(kv, q, c) for kv, q, c in layers]) for layers in (
        [(2, 3, 40), (1, 3, 96), (2, 2, 10)], [(2, 1, 70), (2, 3, 30), (1, 2, 60)], [(1, 1, 20), (2, 3, 20), (2, 3, 20)])]
    values = {}
    for name, dtype, device in (("default", torch.float32, None), ("host", torch.float32, "cpu"),
                                ("bfloat16", torch.bfloat16, None)):
        solvers = output_solvers(adapter, token_ids, precompute=dtype, prefix_only=PREFIX_ONLY, state_device=device)
        fitness = Fitness(adapter, token_ids, solvers=solvers, batch_size=4)
        values[name] = [fitness.evaluate(subnet).value for subnet in subnets]
    assert values["host"] == values["default"]
    assert values["bfloat16"] == pytest.approx(values["default"], rel=2e-2)
    assert sorted(range(3), key=values["bfloat16"].__getitem__) == sorted(range(3), key=values["default"].__getitem__)


def test_the_solver_state_follows_the_scoring_dtype_on_a_gpu_only(make_model):
    dims = adapter_for(make_model("llama")).dims
    on = {device: SearchConfig(model="m", ratio=0.5, device=device) for device in ("cpu", "cuda")}
    assert on["cpu"].state_dtype == "float32" and on["cuda"].state_dtype == "bfloat16"
    assert SearchConfig(model="m", ratio=0.5, device="cuda", solver_dtype="float32").state_dtype == "float32"
    plans = {device: memory_plan(config, dims, 128, memory=None) for device, config in on.items()}
    assert plans["cuda"]["fitness_bytes"] == solver_bytes(dims, 2) < plans["cpu"]["fitness_bytes"] == solver_bytes(dims)
    with pytest.raises(UserError, match="--solver-dtype"):
        SearchConfig(model="m", ratio=0.5, solver_dtype="int8").check()


@pytest.mark.parametrize("evolution", ["tiny", "staged-tiny"])
def test_the_plan_gives_the_seconds_per_candidate_a_run_folder_measured(tiny_model_dir, tiny_data, tmp_path, evolution):
    from search.plan import plan_for

    config = tiny_config(tiny_model_dir, trials=8, evolution=evolution, eval_windows=0)
    assert plan_for(config, run_dir=tmp_path / "run")["seconds_per_candidate"] is None  # nothing measured yet
    run_search(config, tmp_path / "run", progress=False, final=False)
    plan = plan_for(config, run_dir=tmp_path / "run")
    assert plan["measured_trials"] >= 8 and 0 < plan["seconds_per_candidate"] < 60


def test_a_worker_over_several_gpus_keeps_its_solver_state_in_host_memory():
    with pytest.raises(UserError, match="--solver-device cpu"):
        SearchConfig(model="m", ratio=0.5, device="cuda", gpus_per_worker=2).check()
    SearchConfig(model="m", ratio=0.5, device="cuda", gpus_per_worker=2, solver_device="cpu").check()


def test_the_layer_cache_holds_two_candidates_of_a_large_model(make_model):
    from search.fitness import CACHE_BYTES, cache_bound

    small = adapter_for(make_model("llama")).dims
    assert cache_bound(small, 0.5, 2) == CACHE_BYTES
    large = dataclasses.replace(small, num_layers=32, hidden_size=4096, num_heads=32, head_dim=128,
                                intermediate_size=14336)
    one_candidate = 32 * 2 * 4096 * (4096 + 14336) * 0.5  # its rectified o_proj and down_proj at half width
    assert cache_bound(large, 0.5, 2) == pytest.approx(2 * one_candidate, rel=1e-6)


def test_an_order_that_holds_every_windows_projection_inputs_counts_them_before_the_solvers_fill(make_model):
    dims = adapter_for(make_model("llama")).dims
    plans = {name: memory_plan(SearchConfig(model="m", ratio=0.5, importance=name, order_nsamples=256), dims, 128,
                               memory=None) for name in ("osscar", "wanda-sp")}
    # osscar's passes hold o_proj's and down_proj's inputs of every window, space/residual_pass.py
    held = 256 * 512 * (dims.num_heads * dims.head_dim + dims.intermediate_size) * 4
    assert held > plans["wanda-sp"]["fitness_device_bytes"]  # the larger of the two phases' holdings counts
    assert plans["osscar"]["prepare_bytes"] - plans["wanda-sp"]["prepare_bytes"] == (
        held - plans["wanda-sp"]["fitness_device_bytes"])
