"""A worker whose model spans several devices (``--gpus-per-worker``: a device map, accelerate's
hooks between the blocks) scores candidates as one whose model sits whole on its device. Checked on
the CPU with a map that places every block on "cpu" through accelerate's dispatch; what a worker
asks of a Ray cluster, and the GPU placement, without GPUs."""

import pytest
import torch
from transformers import AutoConfig

import search.prepare as prepare
from evaluators.workers import actor_options
from search.prepare import build_fitness, load_prepared, release_fitness
from search.widths import WidthSpace
from space.errors import UserError
from space.models import load_model, worker_placement
from space.subnet import Subnet
from tests.search.test_search import tiny_config


def every_block_on_cpu(model_dir) -> dict:
    """An explicit device map of the tiny Llama: each block its own entry (each gets a hook)."""
    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(layers)), "model.norm", "model.rotary_emb",
             "lm_head"]
    return dict.fromkeys(names, "cpu")


def fitness_values(config, run_dir, subnets) -> list[float]:
    fitness = build_fitness(config, run_dir)
    try:
        return [fitness.evaluate(subnet).value for subnet in subnets]
    finally:
        release_fitness()


def test_the_device_map_path_scores_candidates_as_the_default_path(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    config = tiny_config(tiny_model_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    adapter = load_prepared(config, run_dir).adapter  # the importance scores, in the run folder's file
    space = WidthSpace(adapter.dims, preset=config.preset, mlp_step=config.mlp_step)
    dense = Subnet.dense(adapter.dims)
    subnets = [dense, space.repair(dense, 0.8), space.repair(dense, 0.6)]
    release_fitness()
    default = fitness_values(config, run_dir, subnets)

    placed = []

    def load_placed(*args, **kwargs):  # prepare's load with a device map, as --gpus-per-worker makes it
        loaded = load_model(*args, device_map=every_block_on_cpu(tiny_model_dir), **kwargs)
        placed.append(loaded.model)
        return loaded

    monkeypatch.setattr(prepare, "load_model", load_placed)
    mapped = fitness_values(config, run_dir, subnets)
    assert placed and all(hasattr(layer, "_hf_hook") for layer in placed[0].model.layers)  # the hooks ran
    assert mapped == pytest.approx(default, rel=1e-6)
    assert len(set(default)) == 3  # the candidates differ: the comparison is not of one number


def test_a_worker_on_several_gpus_is_balanced_over_the_ones_it_sees(monkeypatch):
    assert worker_placement("cpu", 4) == {} and worker_placement("cuda", 1) == {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 + i, 80))
    assert worker_placement("cuda", 2) == {"device_map": "balanced", "max_memory": {0: 10, 1: 11}}
    with pytest.raises(UserError, match="sees 2 CUDA"):
        worker_placement("cuda", 3)


def test_a_model_that_would_spill_off_its_devices_is_refused(tiny_model_dir):
    pytest.importorskip("accelerate")
    with pytest.raises(UserError, match="does not fit in the memory of the devices"):
        load_model(str(tiny_model_dir), device_map="sequential", max_memory={"cpu": 10_000})


def test_ray_workers_ask_their_gpus_or_are_refused_when_the_cluster_has_too_few():
    assert actor_options([{"GPU": 8.0, "CPU": 64.0}], 4, 2) == ({"num_gpus": 2, "num_cpus": 1}, None)
    with pytest.raises(UserError, match="needs 6 GPUs, 2 on one node for each worker; the Ray cluster has 4: "
                                        "give --workers 2 or fewer"):
        actor_options([{"GPU": 4.0}], 3, 2)
    with pytest.raises(UserError, match=r"has 6 \(3 \+ 3 by node\): give --workers 2 or fewer"):  # 6 GPUs, 2 workers' worth
        actor_options([{"GPU": 3.0}, {"GPU": 3.0}], 3, 2)
    with pytest.raises(UserError, match="give --gpus-per-worker 1 or fewer"):
        actor_options([{"GPU": 1.0}], 1, 2)


def test_cpu_workers_share_the_cpus_of_the_nodes_they_fit_on():
    assert actor_options([{"CPU": 4.0}], 2, 1) == ({"num_cpus": 2}, 2)
    assert actor_options([{"CPU": 1.0}, {"CPU": 1.0}], 1, 1) == ({"num_cpus": 1}, 1)  # not 2: no node has 2
    assert actor_options([{"CPU": 16.0}, {"CPU": 16.0}], 3, 1) == ({"num_cpus": 8}, 8)  # 10 each would place 2


def test_a_device_map_without_accelerate_names_the_extra(tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UserError, match=r"llm-pruner\[multi-gpu\]"):
        load_model(str(tiny_model_dir), device_map=every_block_on_cpu(tiny_model_dir))
