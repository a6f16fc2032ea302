"""Writing files and folders so that a failure or an interruption never leaves a half-written one:
everything is written beside its destination and renamed into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a file beside ``path`` (a name no other writer uses), flush it to the disk,
    then rename it into place: a reader sees the old file or the new one, even after a power cut,
    and racing writers never share a temporary file (the last rename wins)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; the result gets the usual mode
        fsync_path(tmp)
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def write_json(path: Path, data: dict) -> None:
    """Write JSON whole, then rename into place (tensors as lists, paths and the rest as strings)."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_folder(out_dir: Path) -> None:
    """Undo what a crash left: inside :func:`replace_folder`, when the new folder never arrived, the
    old one (complete) goes back in place; the leftovers of replacements that did finish go, and so
    do the half-written staging folders of writers that died (killed mid-export)."""
    out_dir = Path(out_dir)
    prefix = f".{out_dir.name}.new-"
    for staging in out_dir.parent.glob(f"{prefix}*"):
        pid = staging.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds:
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another writer is in the middle of its replacement
        if not out_dir.exists():
            os.replace(old, out_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)


def replace_folder(staging: Path, out_dir: Path) -> None:
    """Move a complete folder into place; an older folder there is removed only afterwards (a crash
    between the two renames is undone by :func:`recover_folder`)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` to write into; it replaces ``out_dir`` when the block
    ends normally and is removed when it raises (``out_dir`` is then left as it was)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-{os.getpid()}-", dir=out_dir.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is private; the export gets the usual mode
    try:
        yield staging
        for path in staging.rglob("*"):  # some writers (transformers' weight shards) leave their files private
            if path.is_file():
                os.chmod(path, 0o666 & ~_umask())
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
