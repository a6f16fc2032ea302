"""A search job: the run folder and its study, prepared workers, the loop, and the final export.

``run_search`` = open the run folder (:mod:`search.rundir`) → prepare the model and the sampler
(:mod:`search.prepare`) → ask/evaluate/tell (:mod:`search.loop`) → re-score, export, test and
report the winner (:mod:`search.finalize`). Re-running it with the same config resumes.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from evaluators.workers import InProcessPool, RayPool
from search.config import SearchConfig
from search.finalize import finalize
from search.loop import run_loop
from search.plan import check_plan, plan_for
from search.prepare import SearchEvaluator, channel_scores, load_prepared, release_fitness, starts_for, unit_errors
from search.rundir import (IMPORTANCE, check_run_dir, finished_result, open_run_dir, open_study, recover_interrupted,
                           run_lock)
from search.samplers import make_sampler
from search.stages import run_staged
from search.widths import WidthSpace
from space.errors import UserError
from space.scores import score_spec

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    study: optuna.Study
    completed: int
    best: dict | None
    seconds: float


def run_search(
    config: SearchConfig,
    run_dir: Path,
    *,
    workers: int = 0,
    ray_address: str | None = None,
    storage_url: str | None = None,
    progress: bool = True,
    final: bool = True,
) -> SearchResult:
    """Run (or resume) the search ``config`` in ``run_dir``; ``workers`` Ray actors evaluate the
    candidates (0: this process). ``final``: re-score, export and test the winner at the end."""
    started = time.time()
    config.check()
    check_plan(plan_for(config))  # a job that cannot fit its device stops now, not an hour in
    run_dir = Path(run_dir)
    new_folder = not run_dir.exists()
    check_run_dir(run_dir)
    with run_lock(run_dir):
        return _run_locked(config, run_dir, new_folder, started, workers=workers, ray_address=ray_address,
                           storage_url=storage_url, progress=progress, final=final)


def _run_locked(config: SearchConfig, run_dir: Path, new_folder: bool, started: float, *, workers: int,
                ray_address: str | None, storage_url: str | None, progress: bool, final: bool) -> SearchResult:
    open_run_dir(run_dir, config)
    handler = logging.FileHandler(run_dir / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        try:
            study, space, unit_order = _study(config, run_dir, storage_url, workers)
        except UserError:
            if new_folder:  # a mistake found once the model is known: leave no folder that claims this search
                logging.getLogger().removeHandler(handler)
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        factory = SearchEvaluator(config.to_dict(), str(run_dir))
        # the importance scores go to every actor with the job: a worker whose node cannot see the run
        # folder gets the driver's, and one that would search with other scores stops the job at its start
        pool = (RayPool(factory, workers, ray_address, gpus_per_worker=config.gpus_per_worker,
                        files=(run_dir / IMPORTANCE,), trial_timeout=config.trial_timeout) if workers > 0
                else InProcessPool(factory))
        try:
            loop = run_staged if config.staged is not None else run_loop
            # what this process spent before the trials: the model's load, the unit order (cached in the
            # run folder: a resumed search reads it), a staged evolution's fitness statistics and unit errors
            prepare_seconds = time.time() - started
            loop_seconds = loop(study, config, space, pool, progress, run_dir)
        finally:
            pool.close()
        completed = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
        best = None
        if final and completed:
            best = finished_result(run_dir, config, completed)
            if best is None:
                best = finalize(study, config, run_dir, space.dims, unit_order=unit_order,
                                seconds={"prepare": prepare_seconds, "search": loop_seconds})
            else:
                log.info("the search had already finished and exported; its result stands (%s)", run_dir / "best.json")
        return SearchResult(study, completed, best, time.time() - started)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _study(config: SearchConfig, run_dir: Path, storage_url: str | None,
           workers: int) -> tuple[optuna.Study, WidthSpace, dict]:
    """The study with its sampler, started from the one-shot allocations, and the unit order's record
    (:class:`search.prepare.Prepared`); the driver's model is dropped afterwards: the workers, or the
    in-process pool, prepare their own copy."""
    _, adapter, _, ordered, unit_order = load_prepared(config, run_dir, streamed=True)  # computes and caches importance
    space = WidthSpace(adapter.dims, preset=config.preset, mlp_step=config.mlp_step)
    errors = None
    if config.staged is not None:  # level switches are drawn by the fitness's own residuals
        errors = unit_errors(config, run_dir, space)
        if workers:
            release_fitness()  # the workers build their own; the in-process pool reuses this one
    starts = starts_for(config, space, ordered, score_spec(config.importance).standardized, errors)
    sampler = make_sampler(config.searcher, space=space, ratio=config.ratio, starts=starts,
                           channel_scores=channel_scores(ordered), seed=config.seed,
                           evolution_preset=config.evolution, errors=errors)
    study = open_study(run_dir, config, sampler, storage_url)
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("space", space.describe())
    if not study.trials and config.searcher != "evolution":
        for start in starts:  # the other samplers begin where the one-shot rules end
            study.enqueue_trial(space.encode(start))
    # staged evolution scores an interrupted generation again itself (its trials are not queued)
    recover_interrupted(study, requeue=config.staged is None)
    return study, space, unit_order
