"""Files the driver ships to every Ray actor: prepared state a worker must read exactly as the
driver has it (a search's importance scores).

A worker on another node may not see the driver's run folder (no shared file system); one that
finds no scores there, or scores under another key (its copy of the model has other modification
times), computes its own, and would then score candidates in another unit order than the driver's.
So the driver puts each file's bytes in Ray's object store with their SHA-256, and every actor,
before it builds its evaluator, writes the file where the driver has it (unless those bytes are
there already: a shared path) and checks it; after building the evaluator it checks the file
again, so an evaluator that replaced it with scores of its own is caught at start-up.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from space.errors import UserError


class ShippedFileMismatch(UserError):
    """A worker's copy of a shipped file is not the driver's: the job stops with this one message."""


def sha256_of(path: Path) -> str | None:
    """The file's SHA-256 (hex), or None when there is no file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class ShippedFile:
    path: str  # where the driver has it; every actor reads it at the same path
    sha256: str
    content: Any  # a Ray object reference to the file's bytes

    @classmethod
    def put(cls, path: Path) -> "ShippedFile":
        """The driver's side: ``path``'s bytes into the object store (Ray must be initialised)."""
        import ray

        data = Path(path).read_bytes()
        return cls(str(path), hashlib.sha256(data).hexdigest(), ray.put(data))

    def place(self) -> None:
        """An actor's side: the driver's bytes at ``path`` (written beside it and renamed into place,
        so that actors of one node racing on it never leave a half-written file), then checked."""
        import ray

        path = Path(self.path)
        if sha256_of(path) != self.sha256:
            data = ray.get(self.content)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(name, path)
            finally:
                Path(name).unlink(missing_ok=True)
        self.check("placed")

    def check(self, when: str) -> None:
        """Raise :class:`ShippedFileMismatch` unless ``path`` holds the driver's bytes."""
        found = sha256_of(Path(self.path))
        if found != self.sha256:
            what = "is missing" if found is None else f"has SHA-256 {found[:12]}, not the driver's {self.sha256[:12]}"
            raise ShippedFileMismatch(
                f"{self.path} on worker {socket.gethostname()} ({when}) {what}: this worker would search with other "
                "prepared state than the driver (a worker that computed its own importance scores, e.g. from a "
                "copy of the model whose files differ from the driver's); give every node the same model folder")
