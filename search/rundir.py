"""A search's run folder and the Optuna study in it.

Run folder (``--run-dir``)::

    config.yaml      the resolved configuration; a re-run must match it (else refused)
    study.json       the study's name (unique to the run) and where it is stored
    study.journal    the Optuna study (JournalStorage; ``optuna-dashboard study.journal`` opens it)
    .lock            held by the running driver (a second one is refused)
    importance.pt    cached importance scores of the dense model
    search.log       the job's log
    artifacts/       width-profile pictures of the best trials (shown by the dashboard)
    best.json        the chosen subnet, its scores and the test perplexity of its export
    export/          the exported model
    report.md        tables and pictures

Re-running the same command resumes: trials left RUNNING by a killed job are marked FAIL and
their parameters queued again; finished trials are never lost (each ``tell`` is appended and
fsynced to the journal before the next trial starts).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import optuna
import yaml

from search import loop
from search.config import SearchConfig
from space.errors import UserError
from space.export.atomic import write_text
from space.scores.cache import IMPORTANCE_FILE

log = logging.getLogger(__name__)

LEGACY_STUDY_NAME = "search"  # the one name of runs made before names were per run
STUDY_RECORD = "study.json"  # the study's name and where it is stored
LOCK = ".lock"
JOURNAL = "study.journal"
CONFIG = "config.yaml"
IMPORTANCE = IMPORTANCE_FILE  # the run folder's copy of its unit order's scores
BEST = "best.json"
EXPORT = "export"


def open_run_dir(run_dir: Path, config: SearchConfig) -> None:
    """Create the run folder with its config, or check that an existing run is the same search."""
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG
    if path.is_file():
        previous = yaml.safe_load(path.read_text()) or {}
        # a setting added after this run was made compares as its default: the run used that behaviour
        defaults = SearchConfig(model=config.model, ratio=config.ratio).identity()
        stored = {k: v for k, v in {**defaults, **previous}.items() if k not in SearchConfig.RUNTIME}
        mine = config.identity()
        different = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if different:
            details = "; ".join(f"{k}: run has {stored.get(k)!r}, asked {mine.get(k)!r}" for k in different)
            # after a change of the defaults the same command asks for another search: say how to resume
            raise UserError(f"{run_dir} holds a different search ({details}); use another --run-dir, or resume "
                            f"that one with --config {run_dir / CONFIG}")
    elif any(p.name != LOCK for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not a search run folder (no {CONFIG})")
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for one driver: a second one (same folder, any process on this host or
    on a shared file system with locks) is refused with the first one's pid and host. The lock
    goes with the process, so a killed job never leaves the folder locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{run_dir} is in use by {holder}; wait for it, or stop it, before re-running") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder path that names something other than a folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} exists and is not a folder")


def journal_path(run_dir: Path) -> Path:
    """The study journal of a run folder (or the journal file itself)."""
    return run_dir if run_dir.is_file() else run_dir / JOURNAL


def heal_journal(path: Path) -> None:
    """Make a journal loadable again. A partial last line (a writer killed mid-write) is dropped. A
    damaged line before the end (a disk error, a foreign writer) would stop every resume: the whole
    journal is kept as ``<name>.damaged-<time>`` and cut before that line, so the trials recorded
    before it resume (the loss is logged)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    offset = 0
    for number, line in enumerate(lines[:-1], start=1):
        try:
            json.loads(line)
        except ValueError:
            backup = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            shutil.copy2(path, backup)
            log.warning("journal %s: line %d of %d is damaged; resuming from the %d records before it (the whole "
                        "journal is kept in %s)", path, number, len(lines) - 1, number - 1, backup)
            _truncate(path, offset)
            return
        offset += len(line) + 1
    if lines[-1]:
        log.warning("journal %s ended in a partial record (%d bytes); dropping it", path, len(lines[-1]))
        _truncate(path, offset)


def _truncate(path: Path, size: int) -> None:
    with path.open("rb+") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def journal_storage(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _storage_label(storage_url: str | None) -> str:
    """Where a run's study lives, as recorded (an RDB URL without its password)."""
    if not storage_url:
        return JOURNAL
    from sqlalchemy.engine import make_url

    return make_url(storage_url).render_as_string(hide_password=True)


def study_record(run_dir: Path, config: SearchConfig, storage_url: str | None) -> dict:
    """The run's study name and storage, recorded at its first start: the name is unique to the run
    (folder and config), so runs sharing one ``--storage`` database never share a study; a later
    start with another storage is refused (it would begin an empty study beside the real one)."""
    path = run_dir / STUDY_RECORD
    label = _storage_label(storage_url)
    if path.is_file():
        record = json.loads(path.read_text())
        if record["storage"] != label:
            raise UserError(f"{run_dir} keeps its study in {record['storage']}; this command names {label}. "
                            "Re-run with the same --storage (or none, for the run folder's journal)")
        return record
    if (run_dir / JOURNAL).is_file() and not storage_url:  # a run from before study names were recorded
        record = {"study_name": LEGACY_STUDY_NAME, "storage": label}
    else:
        identity = json.dumps({"folder": str(run_dir.resolve()), **config.identity()}, sort_keys=True)
        digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
        record = {"study_name": f"{run_dir.resolve().name}-{digest}", "storage": label}
    write_text(path, json.dumps(record, indent=2) + "\n")
    return record


def load_run_config(run_dir: Path, **overrides) -> SearchConfig:
    """The configuration an existing run folder records (for tools that export or measure its trials),
    with ``overrides`` of its runtime fields (e.g. ``eval_windows``)."""
    return load_config_file(run_dir / CONFIG, **overrides)


def load_config_file(path: Path, **overrides) -> SearchConfig:
    """The configuration a run folder's config.yaml (or a copy of it) records, with ``overrides``."""
    values = yaml.safe_load(path.read_text())
    values["eval_datasets"] = tuple(values.get("eval_datasets", ("wikitext2",)))
    return SearchConfig(**{**values, **overrides})


def load_run_study(run_dir: Path, storage_url: str | None = None) -> optuna.Study:
    """The study of an existing run folder (for reports and tools; the job opens it with :func:`open_study`)."""
    record = json.loads((run_dir / STUDY_RECORD).read_text()) if (run_dir / STUDY_RECORD).is_file() else \
        {"study_name": LEGACY_STUDY_NAME}
    storage = storage_url or journal_storage(run_dir / JOURNAL)
    return optuna.load_study(study_name=record["study_name"], storage=storage)


def open_study(run_dir: Path, config: SearchConfig, sampler, storage_url: str | None) -> optuna.Study:
    record = study_record(run_dir, config, storage_url)
    if storage_url:
        storage = storage_url
    else:
        heal_journal(run_dir / JOURNAL)
        storage = journal_storage(run_dir / JOURNAL)
    directions = ["minimize", "maximize"] if config.multi_objective else ["minimize"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if config.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=record["study_name"], storage=storage, sampler=sampler, pruner=pruner,
                                directions=directions, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise UserError("the stored study has other objectives than this searcher")
    with warnings.catch_warnings():  # experimental in Optuna, stable enough for a label
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([config.fitness_name, "block ratio"][: len(directions)])
    return study


def recover_interrupted(study: optuna.Study, *, requeue: bool = True) -> int:
    """Mark trials a killed job left RUNNING as FAIL and (``requeue``) queue their parameters again."""
    stale = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params and requeue:
            loop.requeue(study, trial)  # in its generation, for a genetic sampler
    if stale:
        log.info("resuming: %d interrupted trial(s) %s", len(stale), "queued again" if requeue else "marked failed")
    return len(stale)


def finished_result(run_dir: Path, config: SearchConfig, completed: int) -> dict | None:
    """``best.json`` of a run that already finished these trials with this config (re-running the
    command of a finished search then re-scores, exports and evaluates nothing), else None."""
    path = run_dir / BEST
    if not path.is_file() or not (run_dir / EXPORT / "subnet.json").is_file():
        return None
    best = json.loads(path.read_text())
    same = best.get("config") == config.to_dict()
    return best if same and best.get("completed_trials") == completed else None
