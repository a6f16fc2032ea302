"""What an experiment script writes: the command that reproduces it, its JSON, and the markdown its report
makes of that JSON (beside it, and printed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from space.export import write_json


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that re-runs ``script`` (its ``__file__``) with ``argv`` (None: this process's arguments)."""
    return f"python experiments/{Path(script).name} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_results(out: Path, data: dict, report: Callable[[dict], str]) -> None:
    """``data`` as JSON to ``out``, its report to ``out`` with ``.md``, and the report printed."""
    write_json(out, data)
    text = report(data)
    out.with_suffix(".md").write_text(text)
    print(text)
