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


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
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


def replace_folder(staging: Path, out_dir: Path) -> None:
    """Move a complete folder into place; an older folder there is removed only afterwards."""
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
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
