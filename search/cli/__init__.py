"""The ``llm-pruner`` command.

Each subcommand (one module here) is a parser, a validation step that checks everything a user
can get wrong before any model is loaded, and a main that does the work. Mistakes a user can make
end with one message on stderr and exit status 2; nothing already written is left half-done.
"""

from __future__ import annotations

import argparse
import logging
import sys

from search.cli import bench, dashboard, evaluate, export, export_gguf, prune, recover, reform, search
from space.errors import JobFailed, UserError

SUBCOMMANDS = (prune, reform, evaluate, bench, search, export, export_gguf, dashboard, recover)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-pruner", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add(sub)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        args.validate(args)
        return args.main(args)
    except UserError as exc:
        print(f"llm-pruner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"llm-pruner {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llm-pruner {args.command}: interrupted", file=sys.stderr)
        return 130
