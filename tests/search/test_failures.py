"""Poison trials: an evaluation that raises or returns NaN fails its trial (with the error on it),
never the job, until ``max_failures`` fail in a row; then the job stops with one message and exit
status 1, keeps what it finished, and a re-run after the fix continues."""

import math
import time

import optuna
import pytest

from evaluators.workers import InProcessPool
from search.cli import main as cli
from search.config import SearchConfig
from search.loop import run_loop
from search.samplers.staged import PRESETS, StagedEvolution
from search.stages import committed, run_staged
from search.widths import WidthSpace
from space.errors import JobFailed
from space.subnet import ModelDims, Subnet

DIMS = ModelDims(num_layers=6, hidden_size=64, head_dim=8, num_heads=8, num_kv_heads=4, intermediate_size=256)
FAIL = optuna.trial.TrialState.FAIL
COMPLETE = optuna.trial.TrialState.COMPLETE


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
    assert len(calls) == 3 and [t.state for t in study.trials] == [FAIL] * 3  # none left RUNNING
    assert all("CUDA out of memory" in t.user_attrs["error"] for t in study.trials)
    pool, _ = pool_of(lambda n: 10.0 + n)  # the cause fixed: the same study continues
    run_loop(study, config, space, pool, False, tmp_path)
    assert len(study.get_trials(states=[COMPLETE])) == 10


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


class _HangsOnce:
    """An evaluator factory whose second evaluation (counted across actors in files) never returns."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __call__(self):
        import os
        import time

        def evaluate(payload):
            calls = len(os.listdir(self.folder))
            open(os.path.join(self.folder, str(calls)), "w").close()
            if calls == 1:
                time.sleep(3600)
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
    pool = RayPool(_HangsOnce(tmp_path), 1, trial_timeout=5.0, startup_timeout=120.0)
    try:
        pool.submit(1, {"subnet": {}})  # the actor's first job: its start-up is not held against it
        assert wait_for_one(pool)[0].result["value"] == 0.0
        pool.submit(2, {"subnet": {}})  # hangs: past the deadline it comes back to be sent again
        assert [(o.job_id, o.worker_died, o.error) for o in wait_for_one(pool)] == [(2, True, "deadline")]
        deadline = time.monotonic() + 300
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
