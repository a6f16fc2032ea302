"""Where candidates are evaluated: in this process, or on a pool of Ray actors.

Both pools take an *evaluator factory*: a picklable callable that builds, once per worker, a
callable ``evaluate(payload: dict) -> dict`` (for the search: load the model and its prepared
state, then score widths). Only the payload (widths) travels to a worker and only the result
dict comes back.

The driver submits jobs while a pool has capacity and collects outcomes as they finish
(``ray.wait``). It knows which job each actor holds; when an actor dies mid-job, the outcome says
so and the driver submits the job again (the actor itself is restarted by Ray and rejoins the pool;
one that dies ``max_restarts`` times in a row, without a finished job between, is retired).

A Ray actor also gets the files the driver ships it (:mod:`evaluators.shipped`: the prepared state
it must read as the driver has it, on any node), and ``gpus_per_worker`` GPUs where the cluster
has GPUs (a worker whose model spans several of them).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evaluators.shipped import ShippedFile, ShippedFileMismatch
from space.errors import JobFailed, UserError

log = logging.getLogger(__name__)

Evaluator = Callable[[dict], dict]
EvaluatorFactory = Callable[[], Evaluator]


@dataclass
class Outcome:
    job_id: int
    payload: dict
    result: dict | None = None
    error: str | None = None
    worker_died: bool = False
    worker: str = ""


def worker_exception(exc: Exception) -> Exception:
    """The worker's own exception, not Ray's wrapper of it (whose text is the remote traceback in
    terminal colours)."""
    from ray.exceptions import RayTaskError

    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def error_text(exc: Exception) -> str:
    """One line for a failed evaluation: the worker's own exception."""
    cause = worker_exception(exc)
    return f"{type(cause).__name__}: {cause}"


def actor_options(nodes: list[dict], workers: int, gpus_per_worker: int) -> tuple[dict, int | None]:
    """What each of ``workers`` actors asks of a Ray cluster whose live nodes have the resources
    ``nodes``, and its torch threads (None: torch's default). An actor lives on one node: where the
    cluster has GPUs, ``gpus_per_worker`` of one node's (Ray makes them the only ones the actor sees);
    else the largest equal share of CPUs that still places every actor on some node."""
    gpus = [int(node.get("GPU", 0)) for node in nodes]
    if sum(gpus):
        fit = sum(g // gpus_per_worker for g in gpus)
        if workers > fit:
            fix = f"give --workers {fit} or fewer" if fit else f"give --gpus-per-worker {max(gpus)} or fewer"
            by_node = f" ({' + '.join(map(str, gpus))} by node)" if len(gpus) > 1 else ""
            raise UserError(f"--workers {workers} x --gpus-per-worker {gpus_per_worker} needs "
                            f"{workers * gpus_per_worker} GPUs, {gpus_per_worker} on one node for each worker; the "
                            f"Ray cluster has {sum(gpus)}{by_node}: {fix}")
        return {"num_gpus": gpus_per_worker, "num_cpus": 1}, None
    cpus = [int(node.get("CPU", 0)) for node in nodes]
    share = next((n for n in range(max(cpus, default=1), 0, -1) if sum(c // n for c in cpus) >= workers), 1)
    return {"num_cpus": share}, share


class InProcessPool:
    """Evaluates each job at once, in this process (``--workers 0``)."""

    def __init__(self, factory: EvaluatorFactory):
        self._factory = factory
        self._evaluate: Evaluator | None = None
        self._done: list[Outcome] = []

    @property
    def capacity(self) -> int:
        return 0 if self._done else 1

    def submit(self, job_id: int, payload: dict, **options: Any) -> None:
        if self._evaluate is None:
            self._evaluate = self._factory()
        try:
            result = self._evaluate({**payload, **options})
        except Exception as exc:  # the evaluation raised (an OOM, an overflow, a bug): the trial fails, not the job
            log.debug("job %d raised", job_id, exc_info=True)
            self._done.append(Outcome(job_id, payload, error=f"{type(exc).__name__}: {exc}", worker="in-process"))
            return
        self._done.append(Outcome(job_id, payload, result=result, worker="in-process"))

    def wait(self) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        self._evaluate = None


class _Actor:
    """The body of a Ray actor: places the files the driver shipped, builds its evaluator once
    (checking that it left those files as they are), then evaluates payloads."""

    def __init__(self, factory: EvaluatorFactory, threads: int | None, files: tuple[ShippedFile, ...] = ()):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.failed_start: ShippedFileMismatch | None = None
        try:
            for file in files:
                file.place()
            self._evaluate = factory()
            for file in files:
                file.check("after its evaluator was built")
        except ShippedFileMismatch as exc:
            # raised here, it would reach the driver only as "the actor died" and Ray would restart the
            # actor to fail again; every job raises it instead, and the pool stops the job with it
            self.failed_start = exc

    def evaluate(self, payload: dict) -> dict:
        if self.failed_start is not None:
            raise self.failed_start
        return {**self._evaluate(payload), "worker": self.name}


@dataclass
class RayPool:
    """``workers`` Ray actors, ``gpus_per_worker`` GPUs each where the cluster has GPUs, else CPU
    threads split between them. ``address``: an existing cluster (``auto``) or None to start a
    local one. ``files``: what every actor must read as the driver has it (shipped, see
    :mod:`evaluators.shipped`)."""

    factory: EvaluatorFactory
    workers: int
    address: str | None = None
    gpus_per_worker: int = 1
    files: tuple[Path, ...] = ()
    max_restarts: int = 3
    trial_timeout: float | None = None  # seconds; None: max(60, 10 x the median so far), 1 h before 3 are done
    startup_timeout: float = 1800.0  # more for the first job of a (re)started actor: it loads the model first
    actors: list = field(default_factory=list)
    _idle: list = field(default_factory=list)
    _inflight: dict = field(default_factory=dict)
    _deaths: dict = field(default_factory=dict)
    _durations: list = field(default_factory=list)
    _fresh: set = field(default_factory=set)  # actors that have not finished a job since they (re)started
    _resting: dict = field(default_factory=dict)  # actor -> (monotonic time it may take a job again, backoff)
    _started_ray: bool = False
    _shipped: tuple = ()  # held while the pool lives: a restarted actor fetches the files again

    def __post_init__(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
            self._started_ray = True
        try:
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            options, threads = actor_options(nodes, self.workers, self.gpus_per_worker)
        except UserError:
            self.close()
            raise
        log.info("starting %d Ray workers (%s)", self.workers, options)
        # Ray restarts an actor however often it dies (its own max_restarts counts over the actor's
        # lifetime, which would retire a healthy worker of a long job after a few passing faults); the
        # pool retires one that dies max_restarts times in a row
        remote = ray.remote(max_restarts=-1, max_task_retries=0, **options)(_Actor)
        self._shipped = tuple(ShippedFile.put(Path(path)) for path in self.files)
        self.actors = [remote.remote(self.factory, threads, self._shipped) for _ in range(self.workers)]
        self._idle = list(self.actors)
        self._fresh = set(self.actors)

    @property
    def capacity(self) -> int:
        now = time.monotonic()
        for actor, (until, backoff) in list(self._resting.items()):
            if until is not None and until <= now:  # rested: back in the pool (its backoff kept until it works)
                self._resting[actor] = (None, backoff)
                if actor in self.actors:
                    self._idle.append(actor)
        return len(self._idle)

    def _rest(self, actor) -> None:
        """An actor Ray calls unavailable (restarting): no job for it until a growing backoff passes,
        so that the driver does not spin resubmitting to it."""
        backoff = min(30.0, 2 * (self._resting.get(actor, (None, 0.5))[1]))
        self._resting[actor] = (time.monotonic() + backoff, backoff)

    def submit(self, job_id: int, payload: dict, **options: Any) -> None:
        actor = self._idle.pop(0)
        ref = actor.evaluate.remote({**payload, **options})
        # the job's clock: a (re)started actor builds its evaluator (loads the model) first
        grace = self.startup_timeout if actor in self._fresh else 0.0
        self._inflight[ref] = (actor, job_id, payload, time.monotonic() + grace)

    def deadline(self) -> float:
        """Seconds a job may take before its actor is taken for stuck (``trial_timeout``)."""
        if self.trial_timeout is not None:
            return self.trial_timeout
        if len(self._durations) < 3:
            return 3600.0
        return max(60.0, 10 * statistics.median(self._durations))

    def wait(self) -> list[Outcome]:
        """The jobs that finished next (at least one, unless a stuck one was taken back first)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        if not self._inflight:
            due = [until for until, _ in self._resting.values() if until is not None]
            if due:  # nothing running: wait for the first actor to come back from its rest
                time.sleep(max(0.0, min(due) - time.monotonic()))
            return []
        limit = self.deadline()
        first_due = min(started for *_, started in self._inflight.values()) + limit
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=max(0.0, first_due - time.monotonic()))
        if not ready:
            return self._take_back_stuck(limit)
        outcomes = []
        for ref in ready:
            actor, job_id, payload, started = self._inflight.pop(ref)
            try:
                result = ray.get(ref)
                outcomes.append(Outcome(job_id, payload, result=result, worker=result.get("worker", "")))
                if actor not in self._fresh:  # a first job's time includes the actor's start
                    self._durations.append(time.monotonic() - started)
                self._fresh.discard(actor)
                self._resting.pop(actor, None)
                self._deaths.pop(actor, None)
                self._idle.append(actor)
            except ActorUnavailableError as exc:  # transient (restarting, a network blip): the actor stays
                # said once per outage: a restarting actor is unavailable at every backoff until it is up
                (log.debug if actor in self._resting else log.warning)(
                    "worker unavailable during job %d (%s); the job goes again", job_id, exc)
                outcomes.append(Outcome(job_id, payload, error=str(exc), worker_died=True))
                self._rest(actor)
            except RayActorError as exc:
                log.warning("worker died during job %d (%s); the job goes to another worker", job_id,
                            type(exc).__name__)
                outcomes.append(Outcome(job_id, payload, error=str(exc), worker_died=True))
                self._retire_or_restart(actor)
            except Exception as exc:  # the evaluation itself raised: a bug or bad input, not a crash
                if isinstance(worker_exception(exc), ShippedFileMismatch):  # every job of it would fail alike
                    raise worker_exception(exc) from None
                log.debug("job %d raised in its worker: %s", job_id, exc)
                outcomes.append(Outcome(job_id, payload, error=error_text(exc)))
                self._idle.append(actor)
        return outcomes

    def _take_back_stuck(self, limit: float) -> list[Outcome]:
        """Kill (Ray restarts them) the actors whose job ran past ``limit``; their jobs go again."""
        import ray

        outcomes = []
        now = time.monotonic()
        for ref, (actor, job_id, payload, started) in list(self._inflight.items()):
            if now - started >= limit:
                allowance = self.startup_timeout if actor in self._fresh else 0.0  # ``started`` holds it
                log.warning("job %d ran %.0f s, past its %.0f s deadline%s: its worker is restarted and the job "
                            "goes again", job_id, now - started + allowance, limit + allowance,
                            " (the actor's start-up included)" if allowance else "")
                del self._inflight[ref]
                ray.kill(actor, no_restart=False)
                outcomes.append(Outcome(job_id, payload, error="deadline", worker_died=True))
                self._retire_or_restart(actor)
        return outcomes

    def _retire_or_restart(self, actor) -> None:
        self._fresh.add(actor)
        deaths = self._deaths[actor] = self._deaths.get(actor, 0) + 1
        if deaths <= self.max_restarts:
            self._idle.append(actor)  # Ray restarts it and it rejoins the pool
            return
        import ray

        ray.kill(actor, no_restart=True)  # retired: Ray stops restarting it
        self.actors.remove(actor)
        if not self.actors:
            raise JobFailed("every Ray worker died (or hung) more often than max_restarts allows; finished trials "
                            "are kept: re-run the same command to resume")

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._idle, self._inflight, self._shipped = [], [], {}, ()
        if self._started_ray:  # a cluster we joined keeps running; the one we started goes
            ray.shutdown()
            self._started_ray = False
