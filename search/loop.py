"""The search loop: ask the sampler, dispatch widths to the pool, tell the study what came back.

One driver writes the study; workers only receive widths and return scores. Every proposal is
projected onto the budget before it is dispatched, and each new best's width profile is attached
to its trial for the dashboard.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import optuna

from evaluators.workers import InProcessPool
from search.artifacts import attach_profile
from search.config import SearchConfig
from search.widths import WidthSpace
from space.errors import JobFailed, UserError
from space.subnet import Subnet

log = logging.getLogger(__name__)

PROJECTION_TRIES = 20  # proposals a sampler may make in a row that no subnet on the grid can meet


def trial_subnet(config: SearchConfig, space: WidthSpace, params: dict) -> Subnet:
    """The subnet a trial evaluates: its widths projected onto the budget (for a range, the
    nearest ratio inside it)."""
    proposal = space.decode(params)
    ratio = config.ratio
    if config.ratio_min is not None:
        ratio = min(max(proposal.ratio(), config.ratio_min), config.ratio)
    return space.repair(proposal, ratio)


class FailureBudget:
    """Stops a job whose evaluations fail systematically (an OOM, a float16 overflow, a bug): after
    ``limit`` failures in a row it raises :class:`JobFailed`; a success resets the count. A failed
    trial is FAIL with its error in ``user_attrs["error"]``, so a re-run after the fix continues."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def record(self, error: str | None) -> None:
        if error is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise JobFailed(f"{self.in_a_row} evaluations failed in a row (--max-failures {self.limit}); the last "
                            f"error: {error}. Finished trials are kept: fix the cause and re-run the same command")


def finished_count(study: optuna.Study) -> int:
    states = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    return len(study.get_trials(deepcopy=False, states=states))


def run_loop(study: optuna.Study, config: SearchConfig, space: WidthSpace, pool, show_progress: bool,
             run_dir: Path) -> float:
    """Ask, dispatch, tell until ``config.trials`` trials are finished; return the wall time."""
    from tqdm.auto import tqdm

    started = time.time()
    report_batches = isinstance(pool, InProcessPool) and config.pruner != "none" and not config.multi_objective
    inflight: dict[int, tuple[optuna.trial.Trial, Subnet]] = {}
    retry: list[tuple[optuna.trial.Trial, Subnet]] = []  # jobs whose worker died
    budget = FailureBudget(config.max_failures)
    done = finished_count(study)
    bar = tqdm(total=config.trials, initial=min(done, config.trials), disable=not show_progress,
               desc="trials", unit="trial", dynamic_ncols=True)
    try:
        while done < config.trials or inflight or retry:
            while pool.capacity > 0 and (retry or (done + len(inflight) < config.trials
                                                   and not generation_full(study, inflight))):
                trial, subnet = retry.pop(0) if retry else _ask(study, config, space)
                inflight[trial.number] = (trial, subnet)
                pool.submit(trial.number, {"subnet": subnet.to_dict()},
                            **({"on_batch": _reporter(trial)} if report_batches else {}))
            for outcome in pool.wait():
                trial, subnet = inflight.pop(outcome.job_id)
                if outcome.worker_died:
                    retry.append((trial, subnet))
                    continue
                error = outcome.error if outcome.error is not None else _tell(study, trial, subnet, outcome,
                                                                              config.multi_objective, run_dir)
                if error is not None:
                    fail_trial(study, trial, error)
                else:
                    done += 1
                    bar.update(1)
                    _set_postfix(bar, study, config.multi_objective)
                budget.record(error)
    except (KeyboardInterrupt, JobFailed):
        for trial, _ in list(inflight.values()) + retry:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            requeue(study, trial)
        log.warning("stopped: %d finished trials are in the study; re-run the same command to resume", done)
        raise
    finally:
        bar.close()
    return time.time() - started


def _generation(trial: optuna.trial.FrozenTrial) -> int | None:
    """The generation a genetic sampler (evolution, NSGA-II) gave a trial, or None."""
    return next((v for k, v in trial.system_attrs.items() if k.endswith(":generation")), None)


def generation_full(study: optuna.Study, inflight: dict) -> bool:
    """Whether every place of a genetic sampler's current generation is taken, some by trials still
    running: the next trial waits for them (else it would start the next generation with parents
    chosen from whichever trials a faster worker had finished), so that a search on several
    workers proposes exactly what it proposes in-process, whatever the workers' timing."""
    sampler = study.sampler
    if not inflight or not isinstance(sampler, optuna.samplers.BaseGASampler) or not sampler.population_size:
        return False
    running = [g for t in study.get_trials(deepcopy=False) if t.number in inflight
               for g in [_generation(t)] if g is not None]
    if not running:
        return False
    current = max(running)
    return len(sampler.get_population(study, current)) + running.count(current) >= sampler.population_size


def requeue(study: optuna.Study, trial: optuna.trial.Trial, **user_attrs) -> None:
    """Queue a failed or interrupted trial's parameters again, in its place: for a genetic sampler
    in its generation (a queued trial is never given one by the sampler, so it would count in no
    generation and be no one's parent)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    system_attrs = {"fixed_params": frozen.params,
                    **{k: v for k, v in frozen.system_attrs.items() if k.endswith(":generation")}}
    carried = {k: v for k, v in frozen.user_attrs.items() if k == "retry_of_failed"}  # still not re-queued twice
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs=system_attrs,
                                              user_attrs={**carried, "requeued_from": trial.number, **user_attrs}))


def _ask(study: optuna.Study, config: SearchConfig, space: WidthSpace) -> tuple[optuna.trial.Trial, Subnet]:
    failure = None
    for _ in range(PROJECTION_TRIES):
        trial = study.ask(fixed_distributions=space.distributions())
        try:
            subnet = trial_subnet(config, space, trial.params)
        except ValueError as exc:  # a proposal the width grid cannot bring onto the budget: the sampler's next
            failure = str(exc)
            trial.set_user_attr("error", failure)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d: %s; another proposal", trial.number, failure)
            continue
        describe_trial(trial, subnet)
        return trial, subnet
    raise UserError(f"{PROJECTION_TRIES} proposals in a row could not be brought onto the budget ({failure}); "
                    "give a finer --mlp-step")


def fitness_error(value: float) -> str | None:
    """Why a fitness value cannot be used, or None."""
    return None if math.isfinite(value) else f"the fitness is {value} (an overflow in a low-precision dtype?)"


def fail_trial(study: optuna.Study, trial: optuna.trial.Trial, error: str) -> None:
    """A trial whose evaluation failed: FAIL, with the error on the trial and in the log, and its
    parameters queued once more (a passing fault, a worker's bad moment, should not cost a
    generation its candidate); a trial that was itself such a retry is not queued again, so a
    poison candidate cannot loop (and the failure budget stops a systematic failure)."""
    retried = trial.user_attrs.get("retry_of_failed") is not None
    log.error("trial %d failed%s: %s", trial.number, " again" if retried else "", error)
    trial.set_user_attr("error", error[:2000])
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if not retried and trial.params:
        requeue(study, trial, retry_of_failed=trial.number)
        log.info("trial %d's candidate is queued again, once", trial.number)


def _reporter(trial: optuna.trial.Trial) -> Callable[[int, float], bool]:
    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    return report


def describe_trial(trial: optuna.trial.Trial, subnet: Subnet) -> None:
    trial.set_user_attr("widths", [[w.kv_heads, w.q_per_kv, w.channels] for w in subnet.layers])
    trial.set_user_attr("block_ratio", subnet.ratio())
    trial.set_user_attr("total_ratio", subnet.total_ratio())
    trial.set_user_attr("params", subnet.total_params())
    trial.set_user_attr("block_params", subnet.block_params())
    trial.set_user_attr("gflops_per_token_512", subnet.flops_per_token(512) / 1e9)
    trial.set_user_attr("attention_ratio", subnet.attention_ratio())
    trial.set_user_attr("mlp_ratio", subnet.mlp_ratio())


def _tell(study, trial, subnet: Subnet, outcome, multi: bool, run_dir: Path) -> str | None:
    """Tell the study a finished evaluation; the error if its value cannot be used."""
    result = outcome.result
    trial.set_user_attr("eval_seconds", result["seconds"])
    trial.set_user_attr("worker", outcome.worker)
    if result.get("pruned"):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return None
    value = result["value"]
    if fitness_error(value) is not None:
        return fitness_error(value)
    if not multi and outcome.worker != "in-process":
        for step, batch_value in enumerate(result["batch_values"]):  # intermediate values, for the record
            trial.report(batch_value, step)
    if not multi and value < _best_value(study):
        attach_profile(study, trial, subnet, run_dir)  # the dashboard shows each new best's widths
    study.tell(trial, [value, subnet.ratio()] if multi else value)
    return None


def _best_value(study) -> float:
    try:
        return study.best_value
    except ValueError:
        return float("inf")


def _set_postfix(bar, study, multi: bool) -> None:
    try:
        if multi:
            bar.set_postfix(front=len(study.best_trials))
        else:
            bar.set_postfix(best=f"{study.best_value:.3f}")
    except ValueError:
        pass
