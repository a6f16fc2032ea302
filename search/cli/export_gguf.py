"""``llm-pruner export-gguf``: an export (or a search's winner) as one GGUF file for llama.cpp."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from search.rundir import CONFIG, EXPORT
from space.errors import UserError
from space.export import SUBNET_FILE
from space.export.gguf import TYPES, plan_gguf, write_gguf


def add(sub) -> None:
    p = sub.add_parser("export-gguf", help="write an export (or a search run's winner) as a GGUF file for llama.cpp")
    p.add_argument("export", type=Path, help="an export folder, or a search run folder (its export/ is used)")
    p.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    p.add_argument("--type", choices=sorted(TYPES), default="f16",
                   help="matrix storage (default f16; q8_0 where rows allow, f16 elsewhere; vectors stay f32)")
    p.set_defaults(validate=validate, main=main)


def export_folder(path: Path) -> Path:
    """The export a path names: the folder itself, or the export of a search run folder."""
    if (path / CONFIG).is_file() and not (path / SUBNET_FILE).is_file():
        if not (path / EXPORT / SUBNET_FILE).is_file():
            raise UserError(f"search run {path} has no {EXPORT}/ yet (the search exports its winner when it ends)")
        return path / EXPORT
    return path


def validate(args) -> None:
    if not args.export.exists():
        raise UserError(f"{args.export} does not exist")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; name the .gguf file to write")
    parent = next((p for p in args.out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {args.out}: {parent} is not a writable folder")
    args.plan = plan_gguf(export_folder(args.export))


def main(args) -> int:
    started = time.time()
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs the temporary file's name
    out = write_gguf(args.plan, args.out, args.type)
    layers = args.plan.layers
    print(f"{out} written ({args.type}, {out.stat().st_size / 2**20:.1f} MiB, {len(layers)} layers, "
          f"{sum(not layer.attention for layer in layers)} without attention, "
          f"{sum(not layer.mlp for layer in layers)} without MLP) in {time.time() - started:.1f} s")
    return 0
