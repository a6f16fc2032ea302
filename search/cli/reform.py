"""``llm-pruner reform``: rectify an existing export again, from its source model."""

from __future__ import annotations

from pathlib import Path

from search.cli import common
from search.oneshot import reform_export
from space.errors import UserError
from space.export import check_destination, read_subnet_record
from space.models import load_model, resolve


def add(sub) -> None:
    p = sub.add_parser("reform", help="rectify an existing export again, from its source model")
    p.add_argument("export", type=Path, help="an export of ours (its subnet.json names the source and kept units)")
    p.add_argument("--out", required=True, type=Path, help="export folder to write (may be the same folder)")
    p.add_argument("--save-dtype", choices=sorted(common.DTYPES), help="dtype of the exported weights (default: as loaded)")
    common.add_reform_options(p, method_flag="--method", mode_flag="--mode")
    common.add_model_options(p)
    common.add_calibration_options(p, nsamples=common.REFORM_NSAMPLES)
    p.set_defaults(validate=validate, main=main)


def validate(args) -> None:
    args.record = read_subnet_record(args.export)
    missing = [key for key in ("source", "subnet", "kept") if key not in args.record]
    if missing:
        raise UserError(f"{args.export}/subnet.json lacks {', '.join(missing)}; it cannot be rectified again")
    args.reform = common.reform_spec(args)
    check_destination(args.out)
    args.source = args.record["source"]["path"]  # absolute for folders and files; the id for the hub
    resolve(args.source)
    args.calibration = common.calibration_from(args, model=args.source)


def main(args) -> int:
    loaded = load_model(args.source, dtype=common.DTYPES[args.dtype], device=args.device,
                        trust_remote_code=args.trust_remote_code)
    subnet, record = reform_export(
        loaded, args.record, reform=args.reform, calibration=args.calibration, out_dir=args.out,
        reformed_from=str(args.export), batch_size=args.batch_size, save_dtype=common.save_dtype(args),
        progress=common.progress(args.quiet),
    )
    print(f"exported {args.out}: {args.reform.method} ({args.reform.mode}) in {record['seconds']['reform']:.1f} s, "
          f"block ratio {subnet.ratio():.4f}")
    return 0
