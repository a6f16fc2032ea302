"""Where candidates are evaluated: in this process, or on a pool of Ray actors.

Both pools take an *evaluator factory*: a picklable callable that builds, once per worker, a
callable ``evaluate(payload: dict) -> dict`` (for the search: load the model and its prepared
state, then score widths). Only the payload (widths) travels to a worker and only the result
dict comes back.

The driver submits jobs while a pool has capacity and collects outcomes as they finish
(``ray.wait``). It knows which job each actor holds; when an actor dies mid-job, the outcome says
so and the driver submits the job again (the actor itself is restarted by Ray, up to
``max_restarts`` times, and rejoins the pool).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

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
        result = self._evaluate({**payload, **options})
        self._done.append(Outcome(job_id, payload, result=result, worker="in-process"))

    def wait(self) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        self._evaluate = None


class _Actor:
    """The body of a Ray actor: builds its evaluator once, then evaluates payloads."""

    def __init__(self, factory: EvaluatorFactory, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self._evaluate = factory()
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def evaluate(self, payload: dict) -> dict:
        return {**self._evaluate(payload), "worker": self.name}


@dataclass
class RayPool:
    """``workers`` Ray actors, one GPU each where the cluster has GPUs, else CPU threads split
    between them. ``address``: an existing cluster (``auto``) or None to start a local one."""

    factory: EvaluatorFactory
    workers: int
    address: str | None = None
    max_restarts: int = 3
    actors: list = field(default_factory=list)
    _idle: list = field(default_factory=list)
    _inflight: dict = field(default_factory=dict)
    _deaths: dict = field(default_factory=dict)

    def __post_init__(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)) // self.workers)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus >= self.workers else {"num_cpus": cpus}
        log.info("starting %d Ray workers (%s)", self.workers, options)
        remote = ray.remote(max_restarts=self.max_restarts, max_task_retries=0, **options)(_Actor)
        threads = None if "num_gpus" in options else cpus
        self.actors = [remote.remote(self.factory, threads) for _ in range(self.workers)]
        self._idle = list(self.actors)

    @property
    def capacity(self) -> int:
        return len(self._idle)

    def submit(self, job_id: int, payload: dict, **options: Any) -> None:
        actor = self._idle.pop(0)
        ref = actor.evaluate.remote({**payload, **options})
        self._inflight[ref] = (actor, job_id, payload)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        if not self._inflight:
            return []
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        outcomes = []
        for ref in ready:
            actor, job_id, payload = self._inflight.pop(ref)
            try:
                result = ray.get(ref)
                outcomes.append(Outcome(job_id, payload, result=result, worker=result.get("worker", "")))
                self._deaths.pop(actor, None)
                self._idle.append(actor)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                log.warning("worker died during job %d (%s); the job goes to another worker", job_id,
                            type(exc).__name__)
                outcomes.append(Outcome(job_id, payload, error=str(exc), worker_died=True))
                deaths = self._deaths[actor] = self._deaths.get(actor, 0) + 1
                if deaths <= self.max_restarts:
                    self._idle.append(actor)  # Ray restarts it and it rejoins the pool
                else:
                    self.actors.remove(actor)
                    if not self.actors:
                        raise RuntimeError("every Ray worker died more often than max_restarts allows")
            except Exception as exc:  # the evaluation itself raised: a bug or bad input, not a crash
                outcomes.append(Outcome(job_id, payload, error=f"{type(exc).__name__}: {exc}"))
                self._idle.append(actor)
        return outcomes

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._idle, self._inflight = [], [], {}
