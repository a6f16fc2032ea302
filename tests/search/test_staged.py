"""Staged evolution: level switches keep the exact budget, stages draw fresh disjoint windows, and a
staged job killed with -9 resumes to exactly the incumbents of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from search.config import SearchConfig
from search.rundir import JOURNAL, load_run_study
from search.samplers.levels import LevelSwitches, UnitErrors, depth_start
from search.samplers.staged import PRESETS, StagedEvolution
from search.stages import STATE
from search.widths import WidthSpace
from space.errors import UserError
from space.subnet import LayerWidths, ModelDims, Subnet

DIMS = ModelDims(num_layers=12, hidden_size=64, head_dim=8, num_heads=8, num_kv_heads=4, intermediate_size=256)


def start(space: WidthSpace, ratio: float = 0.6) -> Subnet:
    return space.repair(Subnet(DIMS, [DIMS.dense_layer()] * DIMS.num_layers), ratio)


@pytest.mark.parametrize("preset", ["wide", "full", "paper", "depth"])
def test_level_switches_keep_the_exact_budget(preset):
    space = WidthSpace(DIMS, preset=preset, mlp_step=16)
    switches = LevelSwitches(space, attention_prob=0.5)
    parent = depth_start(space, 0.6) if preset == "depth" else start(space)
    if preset == "depth":  # whole sub-layers: the quantum is a whole MLP
        assert space.grid == [0, 256] and abs(parent.ratio() - 0.6) < 0.05
    rng = np.random.default_rng(0)
    changed = 0
    for quantum in (16, 32, 64) * 100:
        child = switches.mutate(parent, rng, 256 if preset == "depth" else quantum)
        assert child.block_params() == parent.block_params()  # exactly, not projected
        assert space.contains(child)
        changed += child != parent
        parent = child
    assert changed > 250
    if preset != "paper":  # depth inside the search: some sub-layer reached zero width
        seen_empty = False
        for _ in range(2000):
            parent = switches.mutate(parent, rng, 256 if preset == "depth" else 64)
            seen_empty |= any(w.channels == 0 for w in parent.layers)
        assert seen_empty


@pytest.mark.parametrize("preset", ["wide", "full"])
def test_switches_across_kinds_keep_the_budget_and_move_the_split(preset):
    """A switch across kinds moves parameters between attention and MLP, exactly; without it the
    attention total stays the start's."""
    space = WidthSpace(DIMS, preset=preset, mlp_step=8)
    parent = Subnet(DIMS, [LayerWidths(4, 2, 128)] * DIMS.num_layers)  # every layer at the same shape
    attention = sum(DIMS.attention_params(w.kv_heads, w.q_per_kv) for w in parent.layers)
    rng = np.random.default_rng(0)
    within = LevelSwitches(space, attention_prob=0.5)
    child = parent
    for _ in range(200):
        child = within.mutate(child, rng, 8)
    assert sum(DIMS.attention_params(w.kv_heads, w.q_per_kv) for w in child.layers) == attention
    across = LevelSwitches(space, attention_prob=0.25, across_prob=0.5)
    totals, child = set(), parent
    for _ in range(300):
        child = across.mutate(child, rng, 8)
        assert child.block_params() == parent.block_params() and space.contains(child)
        totals.add(sum(DIMS.attention_params(w.kv_heads, w.q_per_kv) for w in child.layers))
    assert len(totals) > 3


def test_switches_follow_the_residuals():
    """A layer whose residual barely rises when it shrinks gives; one whose residual falls most when
    it grows receives."""
    space = WidthSpace(DIMS, preset="wide", mlp_step=16)
    grid = np.array(space.grid, dtype=float)
    mlp = [(256 - grid) * (0.01 if i == 0 else 10.0 if i == 11 else 1.0) for i in range(DIMS.num_layers)]
    attention = [np.zeros(len(space.shapes)) for _ in range(DIMS.num_layers)]
    switches = LevelSwitches(space, errors=UnitErrors(mlp, attention), attention_prob=0.0, max_switches=1)
    parent = Subnet(DIMS, [LayerWidths(4, 2, 128)] * DIMS.num_layers)
    rng = np.random.default_rng(0)
    gained = np.zeros(DIMS.num_layers)
    for _ in range(400):
        child = switches.mutate(parent, rng, 16)
        gained += [c.channels - p.channels for c, p in zip(child.layers, parent.layers)]
    assert gained[0] == gained.min() < 0 < gained[11] == gained.max()


@pytest.mark.parametrize("preset", ["staged", "staged-8"])
def test_stages_draw_fresh_windows_and_coarse_steps_halve(preset):
    space = WidthSpace(DIMS, preset="wide", mlp_step=16)
    sampler = StagedEvolution(space=space, ratio=0.6, starts=[start(space)], preset=PRESETS[preset], seed=3)
    rows = sampler.stage_rows(5, pool_size=84)
    assert [len(r) for r in rows] == list(PRESETS[preset].windows)
    flat = [r for stage in rows for r in stage]
    assert len(set(flat)) == len(flat)  # no window scores two stages of a generation
    assert rows == sampler.stage_rows(5, pool_size=84) and rows != sampler.stage_rows(6, pool_size=84)
    generations = sampler.generations(400)
    quanta = [sampler.quantum(g, generations) for g in range(1, generations)]
    assert quanta[0] == 64 and quanta[-1] == 16 and quanta == sorted(quanta, reverse=True)
    children = sampler.children(start(space), 1, generations)
    assert len(children) == 16 and len(set(map(str, children))) == 16
    assert all(c.block_params() == start(space).block_params() for c in children)


def test_two_children_combine_at_the_incumbents_size():
    """staged-8-combine: the second stage's two best children joined have both one's and the other's
    changes and the incumbent's size; two attention shapes for one layer, channels off the grid, or a
    preset without combining give none."""
    space = WidthSpace(DIMS, preset="wide", mlp_step=16)
    incumbent = Subnet(DIMS, [LayerWidths(3, 2, 16 if i == 0 else 128) for i in range(DIMS.num_layers)])

    def moved(giver: int, receiver: int, grow: int | None = None, shrink: int | None = None) -> Subnet:
        """16 channels from ``giver`` to ``receiver``; layer ``grow`` to 4 KV heads, ``shrink`` to 2."""
        layers = list(incumbent.layers)
        for layer, delta in ((giver, -16), (receiver, 16)):
            layers[layer] = LayerWidths(3, 2, layers[layer].channels + delta)
        for layer, kv in ((grow, 4), (shrink, 2)):
            if layer is not None:
                layers[layer] = LayerWidths(kv, 2, layers[layer].channels)
        return Subnet(DIMS, layers)

    sampler = StagedEvolution(space=space, ratio=0.6, starts=[incumbent], preset=PRESETS["staged-8-combine"])
    first, second = moved(2, 1), moved(1, 9, grow=3, shrink=4)
    assert first.block_params() == second.block_params() == incumbent.block_params()
    joined = sampler.combined(incumbent, first, second)
    assert [w.channels for w in joined.layers] == [16, 128, 112] + [128] * 6 + [144, 128, 128]  # layer 1: +16 - 16
    assert [w.kv_heads for w in joined.layers][2:6] == [3, 4, 2, 3]
    assert joined.block_params() == incumbent.block_params() and space.contains(joined)
    assert sampler.combined(incumbent, moved(5, 6, grow=3, shrink=4), moved(7, 8, grow=4, shrink=3)) is None
    assert sampler.combined(incumbent, moved(0, 1), moved(0, 9)) is None  # layer 0 would have -16 channels
    assert sampler.combined(None, first, second) is None  # generation 0: no incumbent
    plain = StagedEvolution(space=space, ratio=0.6, starts=[incumbent], preset=PRESETS["staged-8"])
    assert plain.combined(incumbent, first, second) is None


def test_a_combining_staged_search_scores_joined_children_on_the_last_stage(tiny_model_dir, tiny_data, tmp_path,
                                                                             monkeypatch):
    """Each generation whose two best second-stage children touch different layers scores them joined on
    the last stage, as a trial of its own with that stage's value; the incumbents keep the budget."""
    from dataclasses import replace

    from search.job import run_search
    from tests.search.test_search import tiny_config

    monkeypatch.setitem(PRESETS, "staged-tiny", replace(PRESETS["staged-tiny"], combine=True))
    result = run_search(tiny_config(tiny_model_dir, evolution="staged-tiny", trials=24, eval_windows=0),
                        tmp_path / "run", progress=False)
    study = load_run_study(tmp_path / "run")
    by_number = {t.number: t for t in study.get_trials()}
    joined = [t for t in by_number.values() if "combined_from" in t.user_attrs]
    assert joined, "no generation combined its two best children"
    last_stage = len(PRESETS["staged-tiny"].windows) - 1
    for trial in joined:
        first, second = (by_number[n] for n in trial.user_attrs["combined_from"])
        assert first.user_attrs["generation"] == second.user_attrs["generation"] == trial.user_attrs["generation"]
        assert list(trial.intermediate_values) == [last_stage] and trial.value == trial.intermediate_values[last_stage]
        assert trial.user_attrs["stage_windows"] == [PRESETS["staged-tiny"].windows[-1]]
    incumbents = [by_number[e["trial"]] for e in study.user_attrs[STATE]["history"][1:]]
    assert {t.user_attrs["block_params"] for t in incumbents + joined} == {incumbents[0].user_attrs["block_params"]}
    assert result.best["best"]["trial"] in {t.number for t in incumbents}


def test_staged_settings_are_checked(tiny_model_dir):
    with pytest.raises(UserError, match="fitness-nsamples"):
        SearchConfig.create(str(tiny_model_dir), 0.6, evolution="staged", fitness_nsamples=8).check()
    with pytest.raises(UserError, match="pruner"):
        SearchConfig.create(str(tiny_model_dir), 0.6, evolution="staged", pruner="median").check()
    config = SearchConfig.create(str(tiny_model_dir), 0.6, evolution="staged")
    assert config.fitness_windows["nsamples"] == 4 * PRESETS["staged"].pool


def staged_command(model_dir, run_dir):
    return [sys.executable, "-m", "search.cli", "-q", "search", "--model", str(model_dir), "--ratio", "0.6",
            "--trials", "40", "--evolution", "staged-tiny", "--mlp-step", "4", "--run-dir", str(run_dir),
            "--nsamples", "8", "--calib-seqlen", "32", "--fitness-seqlen", "32", "--eval-windows", "0",
            "--final-top-k", "2", "--importance", "wanda-sp"]  # its starts meet the grid at 0.6; osscar's do not


def staged_state(run_dir):
    study = load_run_study(run_dir)
    return study.user_attrs.get(STATE), study


@pytest.mark.slow
def test_staged_search_resumes_after_kill_9_to_the_same_incumbents(tiny_model_dir, tiny_text_dir, tmp_path):
    env = {**os.environ, "LLM_PRUNER_DATA": str(tiny_text_dir)}
    reference = tmp_path / "reference"
    done = subprocess.run(staged_command(tiny_model_dir, reference), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected, _ = staged_state(reference)
    assert expected["generation"] == 10  # 1 + ceil((40 - starts) / 4) generations, the last is 10

    run_dir = tmp_path / "killed"
    job = subprocess.Popen(staged_command(tiny_model_dir, run_dir), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        assert job.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        if (run_dir / JOURNAL).is_file():
            state, _ = staged_state(run_dir)
            if state and state["generation"] >= 3:
                break
        time.sleep(0.1)
    job.send_signal(signal.SIGKILL)
    job.wait()
    interrupted, _ = staged_state(run_dir)
    assert 3 <= interrupted["generation"] < expected["generation"]
    done = subprocess.run(staged_command(tiny_model_dir, run_dir), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, study = staged_state(run_dir)
    drop_trials = [{k: v for k, v in e.items() if k != "trial"} for e in resumed["history"]]
    assert drop_trials == [{k: v for k, v in e.items() if k != "trial"} for e in expected["history"]]
    assert resumed["widths"] == expected["widths"]
    best = json.loads((run_dir / "best.json").read_text())
    assert best["best"]["trial"] in {e["trial"] for e in resumed["history"]}  # the winner is an incumbent


def test_depth_start_removes_the_cheapest_sublayers_first():
    space = WidthSpace(DIMS, preset="depth")
    attention = [np.array([1.0 if i != 4 else 1e-3, 0.0]) for i in range(DIMS.num_layers)]
    mlp = [np.array([5.0 if i != 7 else 1e-3, 0.0]) for i in range(DIMS.num_layers)]
    chosen = depth_start(space, 0.9, UnitErrors(mlp, attention))
    assert chosen.layers[4].heads == 0 and chosen.layers[7].channels == 0  # the cheapest go first
    assert abs(chosen.ratio() - 0.9) < 0.02 and space.contains(chosen)


def test_a_staged_depth_search_runs_and_keeps_whole_sublayers(tiny_model_dir, tiny_data, tmp_path):
    from search.job import run_search
    from tests.search.test_search import tiny_config

    result = run_search(tiny_config(tiny_model_dir, preset="depth", evolution="staged-tiny", trials=10,
                                    eval_windows=0), tmp_path / "run", progress=False)
    widths = result.best["best"]["widths"]
    assert all(w in ([0, 0], [2, 3]) for w in (x[:2] for x in widths)) and all(x[2] in (0, 96) for x in widths)
    assert any(x[:2] == [0, 0] or x[2] == 0 for x in widths)
    # each generation records the last stage's running values per batch, ending at the values it compared
    history = load_run_study(tmp_path / "run").user_attrs[STATE]["history"]
    for entry in history:
        assert entry["batches"]["challenger"][-1] == entry["challenger"]
        if entry["generation"] > 0:
            kept = entry["value"] != entry["challenger"]
            assert not kept or entry["batches"]["incumbent"][-1] == entry["value"]
        else:
            assert entry["batches"]["incumbent"] == []
    assert any(len(entry["batches"]["incumbent"]) for entry in history)
    with pytest.raises(UserError, match="preset depth"):
        SearchConfig.create("m", 0.6, preset="depth", evolution="cpu").check()


def test_tyr_level_database_is_nested_in_equal_parameter_steps(make_model, token_ids):
    """search --method tyr: a layer's levels are prefixes of its osscar order, so each level keeps
    the next sparser level's units, and consecutive MLP levels differ by one grid step of channels."""
    from space.adapters import adapter_for
    from space.order import LayerOrder
    from space.scores import compute_scores

    adapter = adapter_for(make_model("llama"))
    dims = adapter.dims
    scores = compute_scores(adapter, token_ids, ["osscar"], ratio=0.6)["osscar"]
    space = WidthSpace(dims, preset="wide", mlp_step=8)
    for layer_scores in scores:
        order = LayerOrder.from_scores(layer_scores, dims)
        levels = [order.kept(LayerWidths(1, 1, c)) for c in space.grid]
        for sparser, denser, low, high in zip(levels, levels[1:], space.grid, space.grid[1:]):
            assert set(sparser["channels"]) < set(denser["channels"])
            assert dims.mlp_params(high) - dims.mlp_params(low) == 8 * dims.mlp_params(1)
        shapes = sorted(s for s in space.shapes if s[0] and s[1])
        for kv, q in shapes:
            for kv2, q2 in shapes:
                if kv <= kv2 and q <= q2:
                    assert set(order.kept(LayerWidths(kv, q, 0))["heads"]) <= set(order.kept(LayerWidths(kv2, q2, 0))["heads"])
