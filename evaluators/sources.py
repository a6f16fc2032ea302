"""Calibration text of the user's own: a text file (``PATH``) or a field of a JSONL file
(``PATH.jsonl:FIELD``), recorded as ``file:/absolute/path[:field]`` with a fingerprint of the content,
so that an edited file is never taken for the one a cached result was computed on."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from space.errors import UserError

FILE_SOURCE = "file:"


def file_source(spec: str) -> str | None:
    """``spec`` as a file source if it names a file (``PATH`` or ``PATH.jsonl:FIELD``, ``file:`` optional),
    None if it names something else (a built-in dataset); a missing file is refused."""
    raw = spec.strip().removeprefix(FILE_SOURCE)
    candidates = [(raw, "")] + ([tuple(raw.rsplit(":", 1))] if ":" in raw else [])
    for candidate, field in candidates:
        path = Path(candidate).expanduser()
        if path.is_file():
            path = path.resolve()
            if path.suffix == ".jsonl" and not field:
                raise UserError(f"calibration file {path} is JSONL: name its text field, e.g. {path}:text")
            return f"{FILE_SOURCE}{path}" + (f":{field}" if field else "")
    looks_like_file = spec.strip().startswith(FILE_SOURCE) or "/" in raw or \
        raw.split(":")[0].endswith((".txt", ".jsonl", ".md"))
    if looks_like_file:
        raise UserError(f"calibration file not found: {raw}")
    return None


def file_text(source: str) -> str:
    """The text of a file source (a JSONL file's records joined by blank lines)."""
    raw = source.removeprefix(FILE_SOURCE)
    path, field = (raw.rsplit(":", 1) if ".jsonl:" in raw else (raw, ""))
    if not field:
        return Path(path).read_text(encoding="utf-8")
    texts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            if field not in record:
                raise UserError(f"{path} line {number} has no field {field!r}")
            texts.append(str(record[field]))
    return "\n\n".join(texts)


def fingerprint(source: str) -> str:
    """A short hash of a file source's content (cached by path, size and modification time)."""
    path = Path(source.removeprefix(FILE_SOURCE).split(".jsonl:")[0] + (".jsonl" if ".jsonl:" in source else ""))
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
