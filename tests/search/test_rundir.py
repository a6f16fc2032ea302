"""Collisions: one driver per run folder, one study per run (even on a shared database), and a run
that keeps its study where it started."""

import json
import os

import optuna
import pytest

from search.job import run_search
from search.rundir import STUDY_RECORD, load_run_study, run_lock
from space.errors import UserError
from tests.search.test_search import tiny_config


def test_a_second_driver_on_the_same_folder_is_refused_with_the_first_ones_pid(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on "):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released with its holder
        pass


def test_two_runs_on_one_database_keep_separate_studies_and_their_storage(tiny_model_dir, tiny_data, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for name, trials in (("a", 2), ("b", 3)):
        run_search(tiny_config(tiny_model_dir, trials=trials, searcher="random"), tmp_path / name, storage_url=url,
                   progress=False, final=False)
    names = {s.study_name for s in optuna.get_all_study_summaries(url)}
    assert len(names) == 2 and names == {json.loads((tmp_path / r / STUDY_RECORD).read_text())["study_name"]
                                         for r in "ab"}
    complete = [optuna.trial.TrialState.COMPLETE]
    assert [len(load_run_study(tmp_path / r, url).get_trials(states=complete)) for r in "ab"] == [2, 3]
    with pytest.raises(UserError, match="keeps its study in sqlite"):  # switching to the folder's journal
        run_search(tiny_config(tiny_model_dir, trials=4, searcher="random"), tmp_path / "a", progress=False,
                   final=False)


def test_a_damaged_line_inside_the_journal_is_cut_there_and_the_whole_kept(tmp_path):
    from search.rundir import JOURNAL, heal_journal, journal_storage

    path = tmp_path / JOURNAL
    study = optuna.create_study(study_name="s", storage=journal_storage(path))
    for value in range(6):
        study.tell(study.ask(), float(value))
    lines = path.read_bytes().split(b"\n")
    middle = len(lines) // 2
    damaged = lines[:middle] + [b'{"op_code": 5, "worker_id"\x00\x00'] + lines[middle + 1:]
    path.write_bytes(b"\n".join(damaged))
    heal_journal(path)
    kept = optuna.load_study(study_name="s", storage=journal_storage(path))
    assert 0 < len(kept.get_trials(states=[optuna.trial.TrialState.COMPLETE])) < 6
    backups = list(tmp_path.glob(f"{JOURNAL}.damaged-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == b"\n".join(damaged)
    assert path.read_bytes() == b"\n".join(lines[:middle]) + b"\n"
