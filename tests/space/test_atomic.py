"""Files and folders are written whole or not at all: unique temporary names, flushed before the
rename, and a crash between a folder replacement's two renames undone on the next write."""

import os
import stat
import threading

import pytest

from space.export.atomic import recover_folder, staged_folder, write_json, write_text


def test_racing_writers_leave_one_whole_file_and_no_temporary(tmp_path):
    path = tmp_path / "scores.json"

    def writer(i):
        for _ in range(20):
            write_json(path, {"writer": i, "payload": "x" * 10000})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_text().startswith('{\n  "writer"') and len(path.read_text()) > 10000
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private mode


def test_a_crash_between_the_two_renames_is_undone(tmp_path):
    out = tmp_path / "export"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    old = tmp_path / f".export.old-{dead}"
    old.mkdir()
    (old / "model.safetensors").write_text("the previous export")
    recover_folder(out)  # the new folder never arrived: the old one is back
    assert (out / "model.safetensors").read_text() == "the previous export" and not old.exists()
    old.mkdir()  # the new folder did arrive: the leftover goes
    recover_folder(out)
    assert not old.exists() and out.is_dir()


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "export"
    with staged_folder(out) as staging:
        write_text(staging / "a.txt", "first")
    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            write_text(staging / "a.txt", "second")
            raise RuntimeError("killed mid-export")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_staging_folder_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "trial-42"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".trial-42.new-{dead}-abc").mkdir()
    (tmp_path / f".trial-42.new-{os.getppid()}-def").mkdir()  # a live process's
    with staged_folder(out) as staging:
        write_text(staging / "a.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".trial-42.new-{os.getppid()}-def", "trial-42"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's private mode


def test_every_file_of_an_export_gets_the_usual_mode(tmp_path):
    """transformers writes its weight shards private (0600): a serving account could not read them."""
    out = tmp_path / "export"
    with staged_folder(out) as staging:
        private = staging / "model.safetensors"
        private.write_bytes(b"weights")
        os.chmod(private, 0o600)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~mask
