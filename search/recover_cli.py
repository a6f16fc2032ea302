"""The ``recover`` subcommand of ``llm-pruner`` (registered in search/cli.py): LoRA recovery of an
export on calibration text (search/recover.py)."""

from __future__ import annotations

from pathlib import Path

from space.errors import UserError


def add_recover(sub) -> None:
    from search.recover import LoraSpec

    d = LoraSpec()
    p = sub.add_parser("recover", help="LoRA recovery of an export on calibration text, merged and re-exported")
    p.add_argument("export", type=Path, help="an export of ours")
    p.add_argument("--out", required=True, type=Path, help="folder to write (may be the export itself)")
    p.add_argument("--lora-rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lora-alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=d.dropout)
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--calib", default="wikitext2", help="training text (never a test split)")
    p.add_argument("--nsamples", type=int, default=256, help="training windows (default 256)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(validate=validate_recover, main=main_recover)


def validate_recover(args) -> None:
    from evaluators.data import CalibrationSpec, load_text, parse_dataset
    from search.recover import LoraSpec
    from space.export import check_destination, read_subnet_record

    read_subnet_record(args.export)
    check_destination(args.out)
    args.lora = LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, lr=args.lr,
                         epochs=args.epochs, batch_size=args.batch_size)
    args.calibration = CalibrationSpec(args.calib, args.nsamples, args.calib_seqlen, args.seed)
    name, split = parse_dataset(args.calib)
    if split == "test":
        raise UserError("recovery on a test split would leak into the evaluation; use validation or train")
    load_text(name, split or ("train" if name == "c4" else "validation"))


def main_recover(args) -> int:
    from search.cli import _progress
    from search.recover import recover_export

    recovery = recover_export(args.export, lora=args.lora, calibration=args.calibration, out_dir=args.out,
                              progress=_progress(args.quiet))
    losses = ", ".join(f"{x:.3f}" for x in recovery["epoch_losses"])
    print(f"recovered {args.export} -> {args.out}: epoch losses {losses}, {recovery['seconds']:.0f} s")
    return 0
