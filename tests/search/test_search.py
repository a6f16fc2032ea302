"""The search: width space, evolution sampler (in-memory, milliseconds), and whole jobs on a tiny
model (in-process and on Ray workers; resumed after kill -9; reproducible; served by the dashboard)."""

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from search.samplers.evolution import EvolutionSampler
from search.config import SearchConfig
from search.job import run_search
from search.rundir import JOURNAL, load_run_study
from search.widths import WidthSpace
from space.errors import UserError
from space.subnet import LayerWidths, ModelDims, Subnet

DIMS = ModelDims(num_layers=12, hidden_size=64, head_dim=8, num_heads=8, num_kv_heads=4, intermediate_size=256)


def toy_objective(space):
    """A cheap stand-in fitness: prefers wide early layers."""
    def objective(trial):
        s = space.decode({n: trial.suggest_int(n, d.low, d.high) for n, d in space.distributions().items()})
        return sum((i + 1) * (1 - w.channels / 256) for i, w in enumerate(s.layers)) + 0.1 * sum(
            w.heads < 8 for w in s.layers)
    return objective


def sampler(space, seed=0, scores=None, **kw):
    starts = [space.repair(Subnet.dense(DIMS), 0.6)]
    return EvolutionSampler(space=space, ratio=0.6, starts=starts, channel_scores=scores, population_size=8,
                            num_mutants=5, top_k=3, seed=seed, **kw)


# --- width space -----------------------------------------------------------------------------


def test_width_space_round_trips_and_respects_presets():
    full = WidthSpace(DIMS, preset="full", mlp_step=16)
    subnet = full.repair(Subnet.dense(DIMS), 0.5)
    assert full.decode(full.encode(subnet)) == subnet
    paper = WidthSpace(DIMS, preset="paper", mlp_step=16)
    assert all(kv * q >= 7.5 for kv, q in paper.shapes)  # at least 15/16 of the 8 heads
    repaired = paper.repair(Subnet(DIMS, [LayerWidths(1, 1, 0)] * 12), 0.5)
    assert paper.contains(repaired) and abs(repaired.ratio() - 0.5) <= 0.0025
    assert min(w.channels for w in repaired.layers) >= 768 / 11008 * 256


# --- evolution sampler -----------------------------------------------------------------------


def test_every_evolution_child_is_on_the_budget():
    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    study = optuna.create_study(sampler=sampler(space))
    study.optimize(toy_objective(space), n_trials=40)
    for t in study.trials:
        assert abs(space.decode(t.params).ratio() - 0.6) <= 0.003, t.number
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 40  # no duplicates
    assert study.best_value < study.trials[0].value  # evolution improved on its start


def test_generation_state_lives_in_the_study():
    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=sampler(space))
    first.optimize(toy_objective(space), n_trials=20)
    resumed = optuna.load_study(storage=storage, study_name="s", sampler=sampler(space))
    resumed.optimize(toy_objective(space), n_trials=10)
    key = EvolutionSampler._get_generation_key()
    generations = [t.system_attrs[key] for t in resumed.trials]
    assert generations == sorted(generations) and generations[-1] == 3  # 30 trials, 8 per generation


def test_evolution_is_reproducible_by_seed():
    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    runs = []
    for seed in (1, 1, 2):
        study = optuna.create_study(sampler=sampler(space, seed=seed))
        study.optimize(toy_objective(space), n_trials=20)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_mutation_moves_channels_from_low_to_high_importance():
    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    # Layer 0's channels are all unimportant, layer 11's all important.
    scores = [np.full(256, -5.0 if i == 0 else (5.0 if i == 11 else 0.0)) for i in range(12)]
    evo = sampler(space, scores=scores, attention_move_prob=0.0, temperature=0.5)
    parent = space.repair(Subnet(DIMS, [LayerWidths(4, 2, 128)] * 12), 0.6)
    rng = np.random.default_rng(0)
    gained = np.zeros(12)
    for _ in range(300):
        child = evo.mutate(parent, rng, 0.1)
        gained += [c.channels - p.channels for c, p in zip(child.layers, parent.layers)]
    assert gained[0] < 0 < gained[11]
    assert gained[0] == gained.min() and gained[11] == gained.max()


# --- whole jobs on a tiny model --------------------------------------------------------------


def tiny_config(model_dir, ratio: float = 0.6, **overrides) -> SearchConfig:
    values = dict(searcher="evolution", trials=12, evolution="tiny", mlp_step=1, final_top_k=2, eval_windows=1,
                  eval_datasets=("wikitext2", "ptb"))
    values.update(overrides)
    return SearchConfig.create(str(model_dir), ratio, nsamples=8, calib_seqlen=32, fitness_nsamples=4,
                               fitness_seqlen=32, final_nsamples=8, **values)


def finished(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    study = load_run_study(run_dir)
    return study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])


@pytest.fixture(scope="module")
def searched(tiny_model_dir, tiny_text_dir, tmp_path_factory):
    """One in-process search with its final export, shared by the tests that read it."""
    with pytest.MonkeyPatch.context() as patch:  # undone after the module: later tests read the real data
        patch.setenv("LLM_PRUNER_DATA", str(tiny_text_dir))
        run_dir = tmp_path_factory.mktemp("search") / "run"
        result = run_search(tiny_config(tiny_model_dir), run_dir, progress=False)
        yield run_dir, result


def test_in_process_search_completes_and_exports_a_model_that_reloads(searched):
    run_dir, result = searched
    assert result.completed == 12 and len(finished(run_dir)) == 12
    best = json.loads((run_dir / "best.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == best["best"]["total_params"]
    assert abs(best["best"]["block_ratio"] - 0.6) <= 0.003
    assert best["test"]["ppl"] > 1 and best["test"]["split"] == "test"
    assert best["held_out"]["ptb"]["ppl"] > 1 and best["held_out"]["ptb"]["windows"] == 1
    for name in ("report.md", "width_profile.png", "progress.png", "config.yaml", "importance.pt"):
        assert (run_dir / name).is_file(), name
    assert set(best["unit_order"]) == {"seconds", "reused"}
    trial = finished(run_dir)[0]
    assert {"widths", "block_ratio", "total_ratio", "params", "gflops_per_token_512", "eval_seconds",
            "worker"} <= set(trial.user_attrs)


def test_any_trial_exports_as_the_winner_does(searched, tiny_data, tmp_path, capsys):
    from search.cli import main as cli

    run_dir, result = searched
    trial = [t for t in finished(run_dir) if t.number != result.best["best"]["trial"]][0]
    assert cli(["-q", "export", str(run_dir), "--trial", str(trial.number), "--out", str(tmp_path / "t")]) == 0
    record = json.loads((tmp_path / "t" / "subnet.json").read_text())
    assert record["recipe"]["trial"] == trial.number
    config = SearchConfig(**{**result.best["config"], "eval_datasets": tuple(result.best["config"]["eval_datasets"])})
    assert record["recipe"]["export_calibration"] == config.export_calibration_spec().to_dict()
    assert [[w["kv_heads"], w["q_per_kv"], w["channels"]] for w in record["subnet"]["layers"]] == trial.user_attrs["widths"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "t", trust_remote_code=True) is not None
    assert cli(["-q", "export", str(run_dir), "--trial", "999", "--out", str(tmp_path / "u")]) == 2
    assert cli(["-q", "export", str(run_dir), "--ratio", "0.5", "--out", str(tmp_path / "u")]) == 2
    assert "use --trial" in capsys.readouterr().err and not (tmp_path / "u").exists()


def test_rerunning_a_finished_search_keeps_its_result(searched, tiny_model_dir):
    run_dir, first = searched
    exported = (run_dir / "export" / "model.safetensors").stat().st_mtime_ns
    again = run_search(tiny_config(tiny_model_dir), run_dir, progress=False)
    assert again.completed == 12 and again.best == json.loads((run_dir / "best.json").read_text())
    assert again.best["test"] == first.best["test"] and again.best["seconds"] == first.best["seconds"]
    # the wall time counts what came before the trials (the model, the unit order, the statistics) too
    assert first.best["seconds"]["prepare"] > 0 and "preparation" in (run_dir / "report.md").read_text()
    assert (run_dir / "export" / "model.safetensors").stat().st_mtime_ns == exported


def test_a_different_search_in_the_same_run_folder_is_refused(searched, tiny_model_dir):
    run_dir, _ = searched
    with pytest.raises(UserError, match="ratio"):
        run_search(tiny_config(tiny_model_dir, ratio=0.5), run_dir, progress=False)


def test_same_seed_same_trials_and_same_best(tiny_model_dir, tiny_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_search(tiny_config(tiny_model_dir, trials=8), tmp_path / name, progress=False, final=False)
        trials = finished(tmp_path / name)
        runs.append(([t.params for t in trials], [t.value for t in trials]))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]


def test_a_ratio_dependent_order_searches_at_its_target(tiny_model_dir, tiny_data, tmp_path):
    """newton (numerical pruning's score) keeps the target fraction in its mask: the search passes it."""
    result = run_search(tiny_config(tiny_model_dir, importance="newton", trials=4), tmp_path / "run", progress=False,
                        final=False)
    assert result.completed == 4
    assert torch.load(tmp_path / "run" / "importance.pt")["meta"]["ratio"] == 0.6


def test_the_unit_order_is_computed_on_its_own_windows(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """--order-nsamples: the order on more windows than the fitness's least squares fits on."""
    from search import prepare

    passed = []

    def spy(loaded, names, calibration, **options):
        passed.append(calibration)
        return dense_scores(loaded, names, calibration, **options)

    dense_scores = prepare.dense_scores
    monkeypatch.setattr(prepare, "dense_scores", spy)
    config = tiny_config(tiny_model_dir, order_nsamples=12)
    prepare.load_prepared(config, tmp_path / "run")
    assert passed == [config.order_calibration_spec()] and passed[0].nsamples == 12
    assert passed[0] == dataclasses.replace(config.calibration_spec(), nsamples=12)  # region, seed: the statistics'
    assert config.calibration_spec().nsamples == 8 and "order_nsamples" in config.identity()
    with pytest.raises(UserError, match="--order-nsamples"):
        tiny_config(tiny_model_dir, order_nsamples=0).check()


def test_the_preparation_says_whether_it_computed_the_unit_order_or_read_it(tiny_model_dir, tiny_data, tmp_path,
                                                                             monkeypatch):
    """A search's wall time without its order is not a cold command's: best.json says which it was."""
    from search import prepare

    monkeypatch.setenv("LLM_PRUNER_CACHE", str(tmp_path / "cache"))  # nothing computed yet
    config = tiny_config(tiny_model_dir)
    computed = prepare.load_prepared(config, tmp_path / "first").unit_order
    read = prepare.load_prepared(config, tmp_path / "second").unit_order
    assert computed["reused"] is False and read["reused"] is True
    assert read["seconds"] == computed["seconds"] > 0  # what computing took, whenever that was


def test_the_report_gives_a_cached_unit_orders_seconds_beside_the_preparation(searched, tmp_path):
    from search.report import markdown_report

    run_dir, _ = searched
    best = json.loads((run_dir / "best.json").read_text())
    for reused, said in ((True, True), (False, False)):
        markdown_report({**best, "unit_order": {"seconds": 12.0, "reused": reused}}, tmp_path / "report.md")
        text = (tmp_path / "report.md").read_text()
        assert ("the unit order read from the score cache, computed in 12 s" in text) == said
        assert "preparation" in text


def test_a_search_with_the_kl_fitness_records_it(tiny_model_dir, tiny_data, tmp_path):
    result = run_search(tiny_config(tiny_model_dir, fitness="kl", fitness_top_k=16, trials=4), tmp_path / "run",
                        progress=False, final=False)
    assert result.completed == 4 and result.study.metric_names[0] == "calibration KL to the dense model"
    values = [t.value for t in finished(tmp_path / "run")]
    assert all(0 < v < 10 for v in values)  # nats per position, not a perplexity


def test_the_fitness_on_upstream_statistics_scores_the_same_candidates_otherwise(tiny_model_dir, tiny_data, tmp_path):
    """--fitness-statistics upstream: the same search (same candidates, by seed) scored by least squares
    fitted on the model pruned like the first start (its solvers: tests/reform, anchor test)."""
    runs = {}
    for statistics in ("dense", "upstream"):
        config = tiny_config(tiny_model_dir, fitness_statistics=statistics, trials=3)
        assert run_search(config, tmp_path / statistics, progress=False, final=False).completed == 3
        runs[statistics] = finished(tmp_path / statistics)
    assert [t.params for t in runs["dense"]] == [t.params for t in runs["upstream"]]
    assert all(math.isfinite(t.value) for t in runs["upstream"])
    assert runs["dense"][0].value != pytest.approx(runs["upstream"][0].value, rel=1e-4)
    with pytest.raises(UserError, match="fitness-reform lstsq"):
        tiny_config(tiny_model_dir, fitness_statistics="upstream", fitness_reform="none").check()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_trials_with_their_attributes(searched, tmp_path):
    run_dir, _ = searched
    port = free_port()
    # the server's output goes to a file: a pipe nobody reads could fill up and block the server
    log = (tmp_path / "dashboard.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", str(run_dir), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180  # a loaded CI machine imports optuna-dashboard slowly
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30))
                break
            except OSError as exc:
                if time.time() > deadline or server.poll() is not None:
                    server.kill()
                    server.wait()
                    raise AssertionError(f"the dashboard did not answer ({exc}): {(tmp_path / 'dashboard.log').read_text()}")
                time.sleep(0.5)
        study_id = studies["study_summaries"][0]["study_id"]
        detail = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=60))
        trials = detail["trials"]
        assert len([t for t in trials if t["state"] == "Complete"]) == 12
        attrs = {a["key"] for a in trials[0]["user_attrs"]}
        assert {"block_ratio", "widths", "eval_seconds"} <= attrs
        assert any(t["artifacts"] for t in trials)  # width profiles of the best trials
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=120) == 0, (tmp_path / "dashboard.log").read_text()
        log.close()


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_without_losing_trials(tiny_model_dir, tiny_text_dir, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "search.cli", "-q", "search", "--model", str(tiny_model_dir), "--ratio", "0.6",
               "--trials", "30", "--evolution", "tiny", "--mlp-step", "1", "--run-dir", str(run_dir),
               "--nsamples", "8", "--calib-seqlen", "32", "--fitness-nsamples", "16", "--fitness-seqlen", "32",
               "--eval-windows", "0", "--final-top-k", "1"]
    env = {**os.environ, "LLM_PRUNER_DATA": str(tiny_text_dir)}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (run_dir / JOURNAL).is_file() is False or len(finished(run_dir)) < 5:
        assert job.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = {t.number: (t.params, t.value) for t in finished(run_dir)}
    assert 5 <= len(before) < 30
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {t.number: (t.params, t.value) for t in finished(run_dir)}
    assert len(after) == 30
    assert all(after[n] == before[n] for n in before)  # no finished trial lost or changed


@pytest.mark.slow
def test_ray_workers_survive_an_actor_killed_mid_trial(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from evaluators import workers

    killed = []
    submit = workers.RayPool.submit

    def submit_then_kill_once(self, job_id, payload, **options):
        submit(self, job_id, payload, **options)
        if not killed:  # the actor now holds this trial: kill it before it can answer
            actor = next(a for a, j, *_ in self._inflight.values() if j == job_id)
            ray.kill(actor, no_restart=False)
            killed.append(job_id)

    monkeypatch.setattr(workers.RayPool, "submit", submit_then_kill_once)
    try:
        result = run_search(tiny_config(tiny_model_dir, trials=8), tmp_path / "run", workers=2, progress=False)
    finally:
        ray.shutdown()
    assert killed and result.completed == 8
    trials = finished(tmp_path / "run")
    assert killed[0] in {t.number for t in trials}  # the killed trial was evaluated elsewhere
    assert len({t.user_attrs["worker"] for t in trials}) >= 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export", trust_remote_code=True)


def test_a_partial_journal_record_is_dropped_before_resuming(tmp_path):
    from search.rundir import heal_journal

    path = tmp_path / JOURNAL
    path.write_bytes(b'{"op_code": 0}\n{"op_code": 1}\n{"op_co')
    heal_journal(path)
    assert path.read_bytes() == b'{"op_code": 0}\n{"op_code": 1}\n'
    heal_journal(path)  # a whole journal is left as it is
    assert path.read_bytes() == b'{"op_code": 0}\n{"op_code": 1}\n'


class _InterruptingPool:
    """Evaluates two jobs, then the user presses Ctrl-C while the third is in flight."""

    def __init__(self):
        self.jobs, self.done = 0, []

    @property
    def capacity(self):
        return 0 if self.done else 1

    def submit(self, job_id, payload, **options):
        self.jobs += 1
        if self.jobs == 3:
            raise KeyboardInterrupt
        self.done.append(job_id)

    def wait(self):
        from evaluators.workers import Outcome

        done, self.done = self.done, []
        return [Outcome(j, {}, result={"value": 10.0 + j, "batch_values": [10.0 + j], "seconds": 0.0}, worker="w")
                for j in done]


def test_ctrl_c_fails_the_trial_in_flight_and_queues_it_again(tmp_path):
    from search.loop import run_loop

    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    config = SearchConfig(model="m", ratio=0.6, searcher="random", trials=5)
    with pytest.raises(KeyboardInterrupt):
        run_loop(study, config, space, _InterruptingPool(), False, tmp_path)
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2 and states[2] == optuna.trial.TrialState.FAIL
    queued = study.ask(fixed_distributions=space.distributions())  # the interrupted widths come back first
    assert queued.params == study.trials[2].params


def test_any_optuna_rdb_storage_works(tiny_model_dir, tiny_data, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_search(tiny_config(tiny_model_dir, trials=3, searcher="tpe"), tmp_path / "run", storage_url=url,
               progress=False, final=False)
    study = load_run_study(tmp_path / "run", url)
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3
    assert not (tmp_path / "run" / JOURNAL).exists()


def test_nsga2_searches_a_ratio_range_and_reports_a_front(tiny_model_dir, tiny_data, tmp_path):
    # calibration perplexity: on a random tiny model the KL to the dense model barely depends on the ratio
    run_search(tiny_config(tiny_model_dir, searcher="nsga2", ratio=0.8, ratio_min=0.4, trials=10, eval_windows=0,
                           fitness="ppl"), tmp_path / "run", progress=False)
    trials = finished(tmp_path / "run")
    ratios = [t.values[1] for t in trials]
    assert all(0.4 - 0.003 <= r <= 0.8 + 0.004 for r in ratios) and max(ratios) - min(ratios) > 0.1
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert len(best["front"]) >= 2 and (tmp_path / "run" / "front.png").is_file()


def test_fitness_rectifies_caches_and_stops_early(make_model, token_ids):
    from evaluators.perplexity import perplexity
    from reform.local import output_solvers, solver_overrides
    from search.fitness import Fitness
    from space.order import order_model
    from space.adapters import adapter_for
    from space.scores import compute_scores
    from space.views import subnet_view

    model = make_model("llama")
    adapter = adapter_for(model)
    order_model(adapter, compute_scores(adapter, token_ids, ["wanda-sp"])["wanda-sp"])
    solvers = output_solvers(adapter, token_ids)
    fitness = Fitness(adapter, token_ids, solvers=solvers, batch_size=1)
    subnet = Subnet(adapter.dims, [LayerWidths(2, 3, 40), LayerWidths(1, 3, 96), LayerWidths(2, 2, 10)])
    result = fitness.evaluate(subnet)
    with subnet_view(adapter, subnet, solver_overrides(adapter, subnet, solvers)) as view:
        assert result.value == pytest.approx(perplexity(view, token_ids), rel=1e-6)
    with subnet_view(adapter, subnet) as view:
        assert result.value < perplexity(view, token_ids)  # rectified beats unrectified on its own data
    assert len(result.batch_values) == 4 and fitness.cache.misses == 3
    again = fitness.evaluate(subnet)
    assert again.value == result.value and fitness.cache.hits == 3  # every layer from the cache
    stopped = fitness.evaluate(subnet, on_batch=lambda step, value: step == 1)
    assert stopped.pruned and len(stopped.batch_values) == 2


@pytest.mark.parametrize("top_k", [128, 8])
def test_kl_fitness_equals_a_direct_computation(make_model, token_ids, top_k):
    """KL(dense || candidate) per position; with K below the vocabulary (128), the distributions
    coarsened to the dense model's top K tokens and 'the rest'."""
    import torch.nn.functional as F

    from reform.local import output_solvers, solver_overrides
    from search.fitness import Fitness
    from space.adapters import adapter_for
    from space.order import order_model
    from space.scores import compute_scores
    from space.views import subnet_view

    model = make_model("llama").double()
    adapter = adapter_for(model)
    order_model(adapter, compute_scores(adapter, token_ids, ["wanda-sp"])["wanda-sp"])
    solvers = output_solvers(adapter, token_ids)
    fitness = Fitness(adapter, token_ids, solvers=solvers, batch_size=3, kind="kl", top_k=top_k)
    subnet = Subnet(adapter.dims, [LayerWidths(2, 3, 40), LayerWidths(1, 3, 96), LayerWidths(2, 2, 10)])
    with torch.no_grad():  # float32 logits, as the fitness forms them
        p = F.log_softmax(model(token_ids).logits[:, :-1].float(), dim=-1)
        with subnet_view(adapter, subnet, solver_overrides(adapter, subnet, solvers)) as view:
            q = F.log_softmax(view(token_ids).logits[:, :-1].float(), dim=-1)
    top = p.topk(top_k, dim=-1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    direct = (p_top.exp() * (p_top - q_top)).sum(-1)
    if top_k < p.shape[-1]:
        p_rest, q_rest = 1 - p_top.exp().sum(-1), 1 - q_top.exp().sum(-1)
        direct = direct + p_rest * (p_rest.log() - q_rest.log())
    else:  # the whole vocabulary: the plain KL divergence
        torch.testing.assert_close(direct, (p.exp() * (p - q)).sum(-1))
    result = fitness.evaluate(subnet)
    # float32 arithmetic (1 − Σ p over the top K loses digits the direct sum keeps)
    assert result.value == pytest.approx(float(direct.mean()), rel=1e-5 if top_k == 128 else 1e-3)
    assert len(result.batch_values) == 2 and result.value > 0
    assert fitness.evaluate(Subnet.dense(adapter.dims)).value == pytest.approx(0.0, abs=1e-9)
    rows = [3, 0, 2]  # staged selection scores a subset of the windows: the same as those windows alone
    alone = Fitness(adapter, token_ids[rows], solvers=solvers, batch_size=3, kind="kl", top_k=top_k)
    assert fitness.evaluate(subnet, rows=rows).value == pytest.approx(alone.evaluate(subnet).value, rel=1e-9)
    ppl = Fitness(adapter, token_ids, solvers=solvers, batch_size=3)
    assert ppl.evaluate(subnet, rows=rows).value == pytest.approx(
        Fitness(adapter, token_ids[rows], solvers=solvers, batch_size=3).evaluate(subnet).value, rel=1e-9)


@pytest.mark.parametrize("kind", ["ppl", "kl"])
def test_a_child_starts_where_it_differs_from_a_candidate_scored_before(make_model, token_ids, kind):
    """Kept hidden states: the same values as whole passes, bit for bit, with the shared layers skipped."""
    from reform.local import output_solvers
    from search.fitness import Fitness
    from space.adapters import adapter_for

    adapter = adapter_for(make_model("llama"))
    solvers = output_solvers(adapter, token_ids)
    parent = [LayerWidths(2, 3, 40), LayerWidths(1, 3, 96), LayerWidths(2, 2, 10)]
    family = [parent, parent[:2] + [LayerWidths(2, 3, 60)], parent[:1] + [LayerWidths(2, 1, 96), parent[2]],
              [LayerWidths(1, 1, 20)] + parent[1:], parent]
    subnets = [Subnet(adapter.dims, layers) for layers in family]
    values = {}
    for name, prefix_bytes in (("whole", 0), ("reused", 1 << 30)):
        fitness = Fitness(adapter, token_ids, solvers=solvers, batch_size=2, kind=kind, top_k=8,
                          prefix_bytes=prefix_bytes)
        values[name] = [fitness.evaluate(subnet).batch_values for subnet in subnets]
        values[name].append(fitness.evaluate(subnets[2], rows=[3, 0]).batch_values)
        counts = (fitness.prefix.skipped, fitness.prefix.run)
    assert values["reused"] == values["whole"]
    # per batch of 2 windows: the parent runs its 3 blocks, the children 1, 2 and 3, the parent again
    # its last one (the input of a layer is kept, not the model's output); rows [3, 0], a new batch: 3
    assert len({v[-1] for v in values["whole"]}) == 5  # four subnets (the parent twice) and other rows
    assert counts == (2 * (0 + 2 + 1 + 0 + 2) + 0, 2 * (3 + 1 + 2 + 3 + 1) + 3)



def test_kill_9_during_the_final_export_leaves_no_half_export_and_a_rerun_completes(tiny_model_dir, tiny_text_dir,
                                                                                     tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "killed-here"
    flags = ["-q", "search", "--model", str(tiny_model_dir), "--ratio", "0.6", "--trials", "4", "--evolution", "tiny",
             "--mlp-step", "1", "--run-dir", str(run_dir), "--nsamples", "8", "--calib-seqlen", "32",
             "--fitness-nsamples", "4", "--fitness-seqlen", "32", "--eval-windows", "0", "--final-top-k", "1"]
    # the job, with the export's model save made to hang once it has written the weights
    hang = ("import sys, time; from pathlib import Path; import transformers\n"
            "marker, real = Path(sys.argv[1]), transformers.PreTrainedModel.save_pretrained\n"
            "def save(self, folder, *a, **k):\n"
            "    real(self, folder, *a, **k)\n"
            "    marker.write_text(str(folder)); time.sleep(600)\n"
            "transformers.PreTrainedModel.save_pretrained = save\n"
            "from search.cli import main; sys.exit(main(sys.argv[2:]))\n")
    env = {**os.environ, "LLM_PRUNER_DATA": str(tiny_text_dir)}
    job = subprocess.Popen([sys.executable, "-c", hang, str(marker), *flags], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not marker.is_file():
            assert job.poll() is None and time.time() < deadline, "the job ended before its export"
            time.sleep(0.2)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert Path(marker.read_text()).parent == run_dir and not (run_dir / "export").exists()  # none, not half
    done = subprocess.run([sys.executable, "-m", "search.cli", *flags], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "export", trust_remote_code=True) is not None
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".export")) == []  # no leftovers
