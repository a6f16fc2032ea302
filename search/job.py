"""A search job: a run folder, an Optuna study in it, workers, and the final export.

Run folder (``--run-dir``)::

    config.yaml      the resolved configuration; a re-run must match it (else refused)
    study.journal    the Optuna study (JournalStorage; ``optuna-dashboard study.journal`` opens it)
    importance.pt    cached importance scores of the dense model
    search.log       the job's log
    artifacts/       width-profile pictures of the best trials (shown by the dashboard)
    best.json        the chosen subnet, its scores and the test perplexity of its export
    export/          the exported model
    report.md        tables and pictures

Re-running the same command resumes: trials left RUNNING by a killed job are marked FAIL and
their parameters queued again; finished trials are never lost (each ``tell`` is appended and
fsynced to the journal before the next trial starts). One driver writes the study; workers only
receive widths and return scores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import torch
import yaml

from evaluators.data import CalibrationSpec
from evaluators.workers import InProcessPool
from search.samplers import MULTI_OBJECTIVE, SEARCHERS, make_sampler
from search.widths import WidthSpace
from space.errors import UserError
from space.subnet import Subnet

log = logging.getLogger(__name__)

STUDY_NAME = "search"
JOURNAL = "study.journal"
CONFIG = "config.yaml"
IMPORTANCE = "importance.pt"


@dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search; all but the ``RUNTIME`` fields must match to resume."""

    model: str
    ratio: float
    searcher: str = "evolution"
    trials: int = 100
    seed: int = 0
    ratio_min: float | None = None  # nsga2: the front spans [ratio_min, ratio]
    preset: str = "wide"
    mlp_step: int | None = None
    evolution: str = "cpu"
    importance: str = "wanda-sp"
    calibration: dict = field(default_factory=lambda: CalibrationSpec("wikitext2", 64, 512, 0).to_dict())
    fitness_windows: dict = field(default_factory=lambda: CalibrationSpec("wikitext2", 8, 512, 1).to_dict())
    fitness_reform: str = "lstsq"  # lstsq | none: rectify candidates before scoring them
    damping: float = 1e-4
    dtype: str = "bfloat16"
    device: str = "cpu"
    pruner: str = "none"  # none | median (in-process only)
    final_top_k: int = 5
    final_windows: dict = field(default_factory=lambda: CalibrationSpec("wikitext2", 32, 512, 2).to_dict())
    export_reform: str = "local"  # reformation mode of the exported winner (lstsq), as in the fitness
    eval_windows: int | None = 32  # WikiText-2 test windows of 2048 for the export (None: all)

    RUNTIME = ("trials", "pruner", "final_top_k", "eval_windows")

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}

    def calibration_spec(self, which: str = "calibration") -> CalibrationSpec:
        d = getattr(self, which)
        return CalibrationSpec(f"{d['dataset']}:{d['split']}", d["nsamples"], d["seqlen"], d["seed"])

    def check(self) -> None:
        if self.searcher not in SEARCHERS:
            raise UserError(f"unknown searcher {self.searcher!r}; known: {', '.join(SEARCHERS)}")
        if not 0 < self.ratio <= 1:
            raise UserError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ratio_min is not None and not 0 < self.ratio_min < self.ratio:
            raise UserError(f"--ratio-min must be in (0, ratio), got {self.ratio_min}")
        if self.searcher in MULTI_OBJECTIVE and self.ratio_min is None:
            raise UserError(f"searcher {self.searcher} searches a ratio range: give --ratio-min too")
        if self.trials < 1:
            raise UserError("--trials must be at least 1")
        if self.fitness_reform not in ("lstsq", "none"):
            raise UserError("--fitness-reform must be lstsq or none")
        if self.pruner not in ("none", "median"):
            raise UserError("--pruner must be none or median")


# --- run folder ------------------------------------------------------------------------------


def open_run_dir(run_dir: Path, config: SearchConfig) -> None:
    """Create the run folder with its config, or check that an existing run is the same search."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG
    if path.is_file():
        previous = yaml.safe_load(path.read_text()) or {}
        stored = {k: v for k, v in previous.items() if k not in SearchConfig.RUNTIME}
        mine = json.loads(json.dumps(config.identity()))
        different = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if different:
            details = "; ".join(f"{k}: run has {stored.get(k)!r}, asked {mine.get(k)!r}" for k in different)
            raise UserError(f"{run_dir} holds a different search ({details}); use another --run-dir")
    elif any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not a search run folder (no {CONFIG})")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config))), sort_keys=False))
    tmp.replace(path)


def heal_journal(path: Path) -> None:
    """Drop a partial last line a killed writer may have left (the journal would not load)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("journal %s ended in a partial record (%d bytes); dropping it", path, len(data) - keep)
        f.truncate(keep)


def open_study(run_dir: Path, config: SearchConfig, sampler, storage_url: str | None) -> optuna.Study:
    if storage_url:
        storage = storage_url
    else:
        heal_journal(run_dir / JOURNAL)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / JOURNAL)))
    directions = ["minimize", "maximize"] if config.searcher in MULTI_OBJECTIVE else ["minimize"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if config.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner,
                                directions=directions, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise UserError("the stored study has other objectives than this searcher")
    with warnings.catch_warnings():  # experimental in Optuna, stable enough for a label
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["calibration perplexity", "block ratio"][: len(directions)])
    return study


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials a killed job left RUNNING as FAIL and queue their parameters again."""
    stale = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
    if stale:
        log.info("resuming: %d interrupted trial(s) queued again", len(stale))
    return len(stale)


# --- preparation (driver and every worker) ---------------------------------------------------


def load_prepared(config: SearchConfig, run_dir: Path):
    """The permuted dense model (float32) and its sorted scores, from the run folder's cache."""
    from search.oneshot import importance_scores, order_model
    from space.adapters import adapter_for
    from space.models import load_model

    loaded = load_model(config.model, dtype=torch.float32, device=config.device)
    adapter = adapter_for(loaded.model)
    # scores that depend on the target (newton's mask keeps that fraction) get the search's ratio;
    # for an nsga2 front, its upper end
    scores = importance_scores(adapter, loaded.tokenizer, [config.importance],
                               calibration=config.calibration_spec(), source=loaded.source.path,
                               ratio=config.ratio, cache=run_dir / IMPORTANCE)[config.importance]
    orders, ordered = order_model(adapter, scores)
    return loaded, adapter, orders, ordered


@functools.lru_cache(maxsize=1)
def _fitness_parts(config_json: str, run_dir: str):
    """Permuted model in the search dtype and its prefix solvers: built once per process and
    shared by the search's fitness and the final re-scoring (one calibration pass, not two)."""
    from reform.local import output_solvers

    config = SearchConfig(**json.loads(config_json))
    loaded, adapter, _, _ = load_prepared(config, Path(run_dir))
    solvers = None
    if config.fitness_reform == "lstsq":
        solvers = output_solvers(adapter, config.calibration_spec().windows(loaded.tokenizer), damping=config.damping,
                                 precompute=torch.float32)
    adapter.model.to(getattr(torch, config.dtype))
    return adapter, solvers, loaded.tokenizer


def build_fitness(config: SearchConfig, run_dir: Path, *, windows: str = "fitness_windows"):
    """The fitness of this search on the windows ``windows`` names (a field of the config)."""
    from search.fitness import Fitness

    key = json.dumps(dataclasses.asdict(config), sort_keys=True)
    adapter, solvers, tokenizer = _fitness_parts(key, str(run_dir))
    return Fitness(adapter, config.calibration_spec(windows).windows(tokenizer), solvers=solvers)


def release_fitness() -> None:
    """Drop this process's prepared fitness (its model and solvers)."""
    _fitness_parts.cache_clear()


class SearchEvaluator:
    """What a worker runs: widths in, scores out (picklable factory for Ray)."""

    def __init__(self, config: dict, run_dir: str):
        self.config = config
        self.run_dir = run_dir

    def __call__(self):
        fitness = build_fitness(SearchConfig(**self.config), Path(self.run_dir))

        def evaluate(payload: dict) -> dict:
            started = time.time()
            result = fitness.evaluate(Subnet.from_dict(payload["subnet"]), on_batch=payload.get("on_batch"))
            return {"ppl": result.ppl, "batch_ppl": result.batch_ppl, "pruned": result.pruned,
                    "seconds": time.time() - started, "cache_hits": fitness.cache.hits}

        return evaluate


# --- the search loop -------------------------------------------------------------------------


def channel_scores(ordered) -> list[np.ndarray]:
    """Per layer, sorted channel scores standardised within the layer (comparable across layers)."""
    out = []
    for s in ordered:
        c = s.channels.double()
        out.append(((c - c.mean()) / (c.std() if c.std() > 0 else 1.0)).numpy())
    return out


def starts_for(config: SearchConfig, space: WidthSpace, ordered, standardized: bool) -> list[Subnet]:
    """Importance-based allocations the search starts from, inside the space's bounds."""
    from search.allocation import ALLOCATIONS

    starts = []
    for name in ("uniform-mlp", "global", "uniform"):
        try:
            proposal = ALLOCATIONS[name](space.dims, ordered, ratio=config.ratio, standardized=standardized)
            start = space.repair(proposal, config.ratio)
        except ValueError:
            continue
        if start not in starts:
            starts.append(start)
    return starts


def trial_subnet(config: SearchConfig, space: WidthSpace, params: dict) -> Subnet:
    """The subnet a trial evaluates: its widths projected onto the budget (for a range, the
    nearest ratio inside it)."""
    proposal = space.decode(params)
    ratio = config.ratio
    if config.ratio_min is not None:
        ratio = min(max(proposal.ratio(), config.ratio_min), config.ratio)
    return space.repair(proposal, ratio)


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
    started = time.time()
    config.check()
    run_dir = Path(run_dir)
    open_run_dir(run_dir, config)
    handler = logging.FileHandler(run_dir / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        return _run(config, run_dir, workers, ray_address, storage_url, progress, final, started)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _run(config, run_dir, workers, ray_address, storage_url, progress, final, started) -> SearchResult:
    from evaluators.workers import RayPool
    from space.importance import score_spec

    loaded, adapter, orders, ordered = load_prepared(config, run_dir)  # computes and caches importance
    space = WidthSpace(adapter.dims, preset=config.preset, mlp_step=config.mlp_step)
    starts = starts_for(config, space, ordered, score_spec(config.importance).standardized)
    sampler = make_sampler(config.searcher, space=space, ratio=config.ratio, starts=starts,
                           channel_scores=channel_scores(ordered), seed=config.seed,
                           evolution_preset=config.evolution)
    study = open_study(run_dir, config, sampler, storage_url)
    study.set_user_attr("config", json.loads(json.dumps(dataclasses.asdict(config))))
    study.set_user_attr("space", space.describe())
    if not study.trials and config.searcher != "evolution":
        for start in starts:  # the other samplers begin where the one-shot rules end
            study.enqueue_trial(space.encode(start))
    recover_interrupted(study)
    del loaded, adapter  # workers (or the in-process pool) prepare their own copy

    factory = SearchEvaluator(json.loads(json.dumps(dataclasses.asdict(config))), str(run_dir))
    pool = RayPool(factory, workers, ray_address) if workers > 0 else InProcessPool(factory)
    try:
        loop_seconds = _loop(study, config, space, pool, progress, run_dir)
    finally:
        pool.close()
    completed = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    best = None
    if final and completed:
        best = finished_result(run_dir, config, completed)
        if best is None:
            from search.finalize import finalize

            best = finalize(study, config, run_dir, space, search_seconds=loop_seconds)
        else:
            log.info("the search had already finished and exported; its result stands (%s)", run_dir / "best.json")
    return SearchResult(study, completed, best, time.time() - started)


def finished_result(run_dir: Path, config: SearchConfig, completed: int) -> dict | None:
    """``best.json`` of a run that already finished these trials with this config (re-running the
    command of a finished search then re-scores, exports and evaluates nothing), else None."""
    path = run_dir / "best.json"
    if not path.is_file() or not (run_dir / "export" / "subnet.json").is_file():
        return None
    best = json.loads(path.read_text())
    same = best.get("config") == json.loads(json.dumps(dataclasses.asdict(config)))
    return best if same and best.get("completed_trials") == completed else None


def _completed(study) -> int:
    return len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]))


def _loop(study: optuna.Study, config: SearchConfig, space: WidthSpace, pool, show_progress: bool,
          run_dir: Path) -> float:
    """Ask, dispatch, tell until ``config.trials`` trials are finished; return the wall time."""
    from tqdm.auto import tqdm

    started = time.time()
    multi = config.searcher in MULTI_OBJECTIVE
    report_batches = isinstance(pool, InProcessPool) and config.pruner != "none" and not multi
    inflight: dict[int, tuple[optuna.trial.Trial, Subnet]] = {}
    retry: list[tuple[optuna.trial.Trial, Subnet]] = []  # jobs whose worker died
    done = _completed(study)
    bar = tqdm(total=config.trials, initial=min(done, config.trials), disable=not show_progress,
               desc="trials", unit="trial", dynamic_ncols=True)
    try:
        while done < config.trials or inflight or retry:
            while pool.capacity > 0 and (retry or done + len(inflight) < config.trials):
                if retry:
                    trial, subnet = retry.pop(0)
                else:
                    trial = study.ask(fixed_distributions=space.distributions())
                    subnet = trial_subnet(config, space, trial.params)
                    _describe(trial, subnet)
                inflight[trial.number] = (trial, subnet)
                pool.submit(trial.number, {"subnet": subnet.to_dict()},
                            **({"on_batch": _reporter(trial)} if report_batches else {}))
            for outcome in pool.wait():
                trial, subnet = inflight.pop(outcome.job_id)
                if outcome.worker_died:
                    retry.append((trial, subnet))
                elif outcome.error is not None:
                    log.error("trial %d failed: %s", trial.number, outcome.error)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    done += _tell(study, trial, subnet, outcome, multi, run_dir)
                    bar.update(1)
                    _set_postfix(bar, study, multi)
    except KeyboardInterrupt:
        for trial, _ in list(inflight.values()) + retry:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        log.warning("interrupted: %d finished trials are in the study; re-run the same command to resume", done)
        raise
    finally:
        bar.close()
    return time.time() - started


def _reporter(trial: optuna.trial.Trial) -> Callable[[int, float], bool]:
    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    return report


def _describe(trial: optuna.trial.Trial, subnet: Subnet) -> None:
    trial.set_user_attr("widths", [[w.kv_heads, w.q_per_kv, w.channels] for w in subnet.layers])
    trial.set_user_attr("block_ratio", subnet.ratio())
    trial.set_user_attr("total_ratio", subnet.total_ratio())
    trial.set_user_attr("params", subnet.total_params())
    trial.set_user_attr("block_params", subnet.block_params())
    trial.set_user_attr("gflops_per_token_512", subnet.flops_per_token(512) / 1e9)
    trial.set_user_attr("attention_ratio", subnet.attention_ratio())
    trial.set_user_attr("mlp_ratio", subnet.mlp_ratio())


def _tell(study, trial, subnet: Subnet, outcome, multi: bool, run_dir: Path) -> int:
    result = outcome.result
    trial.set_user_attr("eval_seconds", result["seconds"])
    trial.set_user_attr("worker", outcome.worker)
    if result.get("pruned"):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return 1
    if not multi and outcome.worker != "in-process":
        for step, value in enumerate(result["batch_ppl"]):  # intermediate values, for the record
            trial.report(value, step)
    value = result["ppl"]
    if not math.isfinite(value):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return 0
    if not multi and value < _best_value(study):
        from search.finalize import attach_profile

        attach_profile(study, trial, subnet, run_dir)  # the dashboard shows each new best's widths
    study.tell(trial, [value, subnet.ratio()] if multi else value)
    return 1


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
