"""Poison trials: an evaluation that raises or returns NaN fails its trial (with the error on it),
never the job, until ``max_failures`` fail in a row; then the job stops with one message and exit
status 1, keeps what it finished, and a re-run after the fix continues."""

import collections
import hashlib
import json
import math
import random
import sys
import time

import optuna
import pytest

from evaluators.workers import InProcessPool, Outcome
from search.cli import main as cli
from search.config import SearchConfig
from search.job import run_search
from search.loop import run_loop
from search.rundir import load_run_study
from search.samplers.evolution import EvolutionSampler
from search.samplers.staged import PRESETS, StagedEvolution
from search.stages import committed, run_staged
from search.widths import WidthSpace
from space.errors import JobFailed, UserError
from space.subnet import ModelDims, Subnet
from tests.search.test_search import tiny_config

# a guard against a hang, not a timing test: each Ray actor restart takes minutes on a loaded 2-core machine
RESTART_GUARD_S = 600

DIMS = ModelDims(num_layers=6, hidden_size=64, head_dim=8, num_heads=8, num_kv_heads=4, intermediate_size=256)
FAIL = optuna.trial.TrialState.FAIL
COMPLETE = optuna.trial.TrialState.COMPLETE
WAITING = optuna.trial.TrialState.WAITING


def pool_of(behaviour):
    """An in-process pool whose evaluator does ``behaviour(call number)``: a value, or raises."""
    calls = []

    def factory():
        def evaluate(payload):
            calls.append(payload)
            value = behaviour(len(calls))
            return {"value": value, "batch_values": [value], "seconds": 0.0}

        return evaluate

    return InProcessPool(factory), calls


def raise_always(_):
    raise RuntimeError("CUDA out of memory")


def study_and_space(tmp_path):
    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return study, space


def test_a_systematic_failure_stops_the_job_after_max_failures(tmp_path):
    study, space = study_and_space(tmp_path)
    config = SearchConfig(model="m", ratio=0.6, searcher="random", trials=10, max_failures=3)
    pool, calls = pool_of(raise_always)
    with pytest.raises(JobFailed, match="3 evaluations failed in a row.*CUDA out of memory"):
        run_loop(study, config, space, pool, False, tmp_path)
    # trial 0 fails, its candidate once more (trial 1) fails and is not queued again; trial 2's is queued
    assert len(calls) == 3 and [t.state for t in study.trials] == [FAIL] * 3 + [WAITING]  # none left RUNNING
    assert all("CUDA out of memory" in t.user_attrs["error"] for t in study.trials[:3])
    assert [t.params == study.trials[0].params for t in study.trials] == [True, True, False, False]
    assert study.trials[3].params == {} and study.trials[3].system_attrs["fixed_params"] == study.trials[2].params
    pool, _ = pool_of(lambda n: 10.0 + n)  # the cause fixed: the same study continues
    run_loop(study, config, space, pool, False, tmp_path)
    assert len(study.get_trials(states=[COMPLETE])) == 10
    assert study.trials[3].params == study.trials[2].params  # the queued candidate went first


def test_occasional_nan_and_exceptions_fail_their_trials_only(tmp_path):
    study, space = study_and_space(tmp_path)
    config = SearchConfig(model="m", ratio=0.6, searcher="random", trials=12, max_failures=2)

    def flaky(n):  # one failure in two, never two in a row
        if n % 4 == 0:
            raise ValueError("bad batch")
        return math.nan if n % 4 == 2 else 5.0 + n

    pool, _ = pool_of(flaky)
    run_loop(study, config, space, pool, False, tmp_path)
    errors = [t.user_attrs["error"] for t in study.get_trials(states=[FAIL])]
    assert len(study.get_trials(states=[COMPLETE])) == 12 and len(errors) == 11
    for t in study.get_trials(states=[FAIL]):  # each failed candidate went once more, in the next trial
        assert study.trials[t.number + 1].params == t.params
    assert {e.split(":")[0] for e in errors} == {"ValueError", "the fitness is nan (an overflow in a low-precision dtype?)"}


def test_staged_evolution_stops_on_a_systematic_failure_and_resumes(tmp_path):
    study, space = study_and_space(tmp_path)
    starts = [space.repair(Subnet.dense(DIMS), 0.6)]
    study = optuna.create_study(sampler=StagedEvolution(space=space, ratio=0.6, starts=starts,
                                                        preset=PRESETS["staged-tiny"]))
    config = SearchConfig(model="m", ratio=0.6, evolution="staged-tiny", trials=13, max_failures=3,
                          fitness_windows={"dataset": "wikitext2", "split": "validation", "nsamples": 24,
                                           "seqlen": 8, "seed": 1, "region": [0.6, 0.8]})
    pool, _ = pool_of(lambda n: 3.0 if n < 6 else raise_always(n))
    with pytest.raises(JobFailed):
        run_staged(study, config, space, pool, False, tmp_path)
    assert committed(study)["generation"] == 0  # generation 0 finished; generation 1 failed and is not committed
    assert not study.get_trials(states=[optuna.trial.TrialState.RUNNING])
    pool, _ = pool_of(lambda n: 1.0 / n)
    run_staged(study, config, space, pool, False, tmp_path)
    assert committed(study)["generation"] == 3


def test_the_command_line_says_stopped_and_exits_1(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    import search.cli.search as command

    def failing(*args, **kwargs):
        raise JobFailed("3 evaluations failed in a row")

    monkeypatch.setattr(command, "run_search", failing)
    status = cli(["-q", "search", "--model", str(tiny_model_dir), "--ratio", "0.6", "--run-dir", str(tmp_path / "r"),
                  "--eval-windows", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err == ["llm-pruner search: stopped: 3 evaluations failed in a row"]


class _Misbehaves:
    """An evaluator factory that counts its evaluations across actors in files and misbehaves at some:
    ``hang`` (the second never returns) or ``die`` (every second kills its actor's process)."""

    def __init__(self, folder, how: str):
        self.folder, self.how = str(folder), how

    def __call__(self):
        import os
        import time

        def evaluate(payload):
            calls = len(os.listdir(self.folder))
            open(os.path.join(self.folder, str(calls)), "w").close()
            if self.how == "hang" and calls == 1:
                time.sleep(3600)
            if self.how == "die" and calls % 2 == 1:
                os._exit(1)
            return {"value": float(calls), "batch_values": [1.0], "seconds": 0.0}

        return evaluate


def wait_for_one(pool):
    outcomes = []
    while not outcomes:
        outcomes = pool.wait()
    return outcomes


@pytest.mark.slow
def test_a_hung_ray_worker_is_restarted_and_its_job_sent_again(tmp_path):
    ray = pytest.importorskip("ray")
    from evaluators.workers import RayPool

    if ray.is_initialized():
        ray.shutdown()
    pool = RayPool(_Misbehaves(tmp_path, "hang"), 1, trial_timeout=5.0, startup_timeout=600.0)
    try:
        pool.submit(1, {"subnet": {}})  # the actor's first job: its start-up is not held against it
        assert wait_for_one(pool)[0].result["value"] == 0.0
        pool.submit(2, {"subnet": {}})  # hangs: past the deadline it comes back to be sent again
        assert [(o.job_id, o.worker_died, o.error) for o in wait_for_one(pool)] == [(2, True, "deadline")]
        deadline = time.monotonic() + RESTART_GUARD_S
        while time.monotonic() < deadline:  # to the restarted actor (Ray says unavailable while it restarts)
            while not pool.capacity:  # an unavailable actor rests before it takes a job again
                pool.wait()
            pool.submit(2, {"subnet": {}})
            outcome = wait_for_one(pool)[0]
            if not outcome.worker_died:
                break
        assert outcome.result["value"] >= 2.0
    finally:
        pool.close()
    assert not ray.is_initialized()  # the pool started Ray, so it shut it down


@pytest.mark.slow
def test_an_actor_that_dies_now_and_then_is_restarted_past_max_restarts(tmp_path):
    """max_restarts counts deaths in a row: two deaths, each after a finished job, retire nobody (Ray's own
    max_restarts=1, per lifetime, would have left the actor dead after the second)."""
    ray = pytest.importorskip("ray")
    from evaluators.workers import RayPool

    if ray.is_initialized():
        ray.shutdown()
    pool = RayPool(_Misbehaves(tmp_path, "die"), 1, max_restarts=1, startup_timeout=600.0)
    finished, deaths = [], 0
    try:
        deadline = time.monotonic() + RESTART_GUARD_S
        while len(finished) < 3 and time.monotonic() < deadline:
            while not pool.capacity:
                pool.wait()
            pool.submit(len(finished), {"subnet": {}})
            for outcome in wait_for_one(pool):
                deaths += outcome.worker_died
                if not outcome.worker_died:
                    finished.append(outcome.result["value"])
        assert len(finished) == 3 and deaths >= 2 and len(pool.actors) == 1
    finally:
        pool.close()


def test_a_picture_that_cannot_be_written_does_not_fail_the_trial(tmp_path, monkeypatch):
    import search.artifacts as artifacts

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.report, "width_profile", full_disk)
    study, space = study_and_space(tmp_path)
    config = SearchConfig(model="m", ratio=0.6, searcher="random", trials=3)
    pool, _ = pool_of(lambda n: 10.0 - n)  # every trial a new best: each would get a picture
    run_loop(study, config, space, pool, False, tmp_path)
    assert [t.state for t in study.trials] == [COMPLETE] * 3


def score(payload: dict) -> float:
    """A stand-in fitness: a fixed pseudo-random value per candidate."""
    widths = json.dumps(payload["subnet"]["layers"]).encode()
    return int(hashlib.sha256(widths).hexdigest()[:8], 16) / 2**32


def scored(payload: dict) -> dict:
    return {"value": score(payload), "batch_values": [score(payload)], "seconds": 0.0}


class ShuffledPool:
    """``slots`` workers whose jobs finish in a seeded random order. Faults: the first attempt of the
    jobs ``raise_first`` raises, of ``die_first`` loses its worker; every attempt of the candidates
    of ``poison`` (first seen in those jobs) raises."""

    def __init__(self, slots=2, seed=0, raise_first=(), die_first=(), poison=()):
        self.slots, self.rng, self.jobs, self.attempted = slots, random.Random(seed), [], set()
        self.raise_first, self.die_first, self.poison, self.poisoned = set(raise_first), set(die_first), set(poison), []

    @property
    def capacity(self) -> int:
        return self.slots - len(self.jobs)

    def submit(self, job_id, payload, **options):
        self.jobs.append((job_id, payload))

    def wait(self):
        job_id, payload = self.jobs.pop(self.rng.randrange(len(self.jobs)))
        first = job_id not in self.attempted
        self.attempted.add(job_id)
        if job_id in self.poison:
            self.poisoned.append(payload["subnet"]["layers"])
        if first and job_id in self.die_first:
            return [Outcome(job_id, payload, error="killed", worker_died=True)]
        if (first and job_id in self.raise_first) or payload["subnet"]["layers"] in self.poisoned:
            return [Outcome(job_id, payload, error="RuntimeError: injected")]
        return [Outcome(job_id, payload, result=scored(payload), worker="w")]


def evolution_search(tmp_path, pool, trials=20, max_failures=3):
    space = WidthSpace(DIMS, preset="full", mlp_step=8)
    sampler = EvolutionSampler(space=space, ratio=0.6, starts=[space.repair(Subnet.dense(DIMS), 0.6)],
                               population_size=6, num_mutants=4, top_k=2, seed=0)
    study = optuna.create_study(sampler=sampler)
    config = SearchConfig(model="m", ratio=0.6, trials=trials, max_failures=max_failures)
    run_loop(study, config, space, pool, False, tmp_path)
    return study


def completed(study) -> list[tuple[str, float]]:
    """(params, value) of the completed trials, in trial order."""
    return [(json.dumps(t.params, sort_keys=True), t.value) for t in study.get_trials(states=[COMPLETE])]


def in_process_scored():
    return InProcessPool(lambda: scored)


def test_a_search_on_several_workers_proposes_what_it_proposes_in_process(tmp_path):
    alone = evolution_search(tmp_path, in_process_scored())
    for slots, seed in [(2, 1), (3, 2)]:  # whatever order the workers finish in
        assert completed(evolution_search(tmp_path, ShuffledPool(slots, seed))) == completed(alone)


def test_a_failed_candidate_goes_once_more_in_its_place(tmp_path):
    undisturbed = evolution_search(tmp_path, ShuffledPool(2, seed=1))
    study = evolution_search(tmp_path, ShuffledPool(2, seed=2, raise_first={5, 13}, die_first={8, 9}))
    failed = study.get_trials(states=[FAIL])
    assert [t.number for t in failed] == [5, 13] and all(t.user_attrs["error"] == "RuntimeError: injected"
                                                         for t in failed)
    again = [t for t in study.trials if t.user_attrs.get("retry_of_failed") is not None]
    assert [(t.user_attrs["requeued_from"], t.state) for t in again] == [(5, COMPLETE), (13, COMPLETE)]
    for old, new in zip(failed, again):  # the same candidate, in the same generation
        assert new.params == old.params and new.system_attrs["EvolutionSampler:generation"] == \
            old.system_attrs["EvolutionSampler:generation"]
    # the same candidates, each once (the queued ones later in trial order), and the same best
    assert sorted(completed(study)) == sorted(completed(undisturbed)) and len(completed(study)) == 20
    assert len(set(completed(study))) == 20
    assert (study.best_params, study.best_value) == (undisturbed.best_params, undisturbed.best_value)


def test_a_poison_candidate_fails_twice_and_is_not_queued_again(tmp_path):
    pool = ShuffledPool(2, seed=3, poison={4})
    study = evolution_search(tmp_path, pool)
    failed = study.get_trials(states=[FAIL])
    assert len(failed) == 2 and failed[0].params == failed[1].params
    assert failed[1].user_attrs["retry_of_failed"] == failed[0].number
    assert len(study.get_trials(states=[COMPLETE])) == 20 and not study.get_trials(states=[WAITING])
    counts = collections.Counter(json.dumps(t.params, sort_keys=True) for t in study.trials)
    assert max(counts.values()) == 2  # the poison candidate twice, every other once


class _Raising:
    """A search evaluator factory whose evaluations always raise (a systematic failure)."""

    def __init__(self, *args):
        pass

    def __call__(self):
        def evaluate(payload):
            raise RuntimeError("CUDA out of memory")

        return evaluate


def test_a_persistent_failure_stops_the_command_by_the_budget_without_looping(tiny_model_dir, tiny_data, tmp_path,
                                                                             monkeypatch, capsys):
    import search.job as job

    monkeypatch.setattr(job, "SearchEvaluator", _Raising)
    status = cli(["-q", "search", "--model", str(tiny_model_dir), "--ratio", "0.6", "--run-dir", str(tmp_path / "r"),
                  "--evolution", "tiny", "--mlp-step", "1", "--nsamples", "8", "--calib-seqlen", "32", "--fitness-nsamples", "2",
                  "--fitness-seqlen", "32", "--eval-windows", "0", "--trials", "10", "--max-failures", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "4 evaluations failed in a row" in err[0]
    study = load_run_study(tmp_path / "r")
    assert [t.state for t in study.trials] == [FAIL] * 4  # none left RUNNING
    params = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert params[0] == params[1] != params[2] == params[3]  # each candidate failed twice, then the next
    assert [t.user_attrs.get("retry_of_failed") for t in study.trials] == [None, 0, None, 2]


def test_a_worker_exception_is_written_as_its_own_one_line_text():
    pytest.importorskip("ray")
    from ray.exceptions import RayTaskError

    from evaluators.workers import error_text

    wrapped = RayTaskError("evaluate", "Traceback (most recent call last):\n  \x1b[36mray::_Actor.evaluate()\x1b[39m",
                           RuntimeError("injected fault")).as_instanceof_cause()
    assert "\x1b[36m" in str(wrapped) and error_text(wrapped) == "RuntimeError: injected fault"
    assert error_text(ValueError("bad batch")) == "ValueError: bad batch"


@pytest.mark.parametrize("searcher", ["evolution", "tpe"])
def test_a_proposal_the_grid_cannot_bring_onto_the_budget_is_drawn_again(tiny_model_dir, tiny_data, tmp_path,
                                                                        searcher):
    """The tiny model's default MLP step (8 of 96 channels) cannot meet the budget for some proposals:
    the evolution draws another child, other samplers' trials fail and the sampler proposes again."""
    config = tiny_config(tiny_model_dir, mlp_step=None, searcher=searcher, trials=12, eval_windows=0,
                         importance="wanda-sp")  # its starts meet the budget on the tiny text; osscar's do not
    run_search(config, tmp_path / "run", progress=False)
    trials = load_run_study(tmp_path / "run").get_trials(deepcopy=False)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 12
    assert all("ratio" in t.user_attrs["error"] for t in trials if t.state == optuna.trial.TrialState.FAIL)


def test_a_grid_that_never_meets_the_budget_stops_with_one_message(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    def never(self, subnet, ratio):
        raise ValueError("projection reached ratio 0.61, not 0.6")

    monkeypatch.setattr(WidthSpace, "repair", never)
    # the starts are the first proposals to fail: the job stops before the loop, with the same advice
    with pytest.raises(UserError, match="none of the one-shot allocations.*brought onto ratio.*--mlp-step"):
        run_search(tiny_config(tiny_model_dir, searcher="tpe", trials=4), tmp_path / "run", progress=False)


def test_a_search_without_optuna_dashboard_installed_finishes_and_reports(tiny_model_dir, tiny_data, tmp_path,
                                                                         monkeypatch):
    """The dashboard is an optional extra: without it the search ends with its report (no notes)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("optuna_dashboard") else real(name, *a))
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # an import would raise
    run_search(tiny_config(tiny_model_dir, trials=4, eval_windows=0), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.json").is_file() and (tmp_path / "run" / "report.md").is_file()
