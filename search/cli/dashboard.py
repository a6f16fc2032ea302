"""``llm-pruner dashboard``: serve a run's study with optuna-dashboard on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

from search.dashboard import check_available, serve
from search.rundir import journal_path
from space.errors import UserError


def add(sub) -> None:
    p = sub.add_parser("dashboard", help="serve a run's study with optuna-dashboard on 127.0.0.1")
    p.add_argument("run_dir", type=Path, help="a search run folder (or a study.journal file)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(validate=validate, main=main)


def validate(args) -> None:
    check_available()
    if not journal_path(args.run_dir).is_file():
        raise UserError(f"no study journal in {args.run_dir}")
    if not 0 < args.port < 65536:
        raise UserError("--port must be in 1..65535")


def main(args) -> int:
    serve(args.run_dir, host=args.host, port=args.port)
    return 0
