"""``llm-pruner recover``: LoRA recovery of an export on calibration text (reform/lora.py)."""

from __future__ import annotations

from pathlib import Path

from evaluators.environment import environment
from reform.lora import LoraSpec, recover_export
from search.cli import common
from space.errors import require_extra
from space.export import check_destination, read_subnet_record


def add(sub) -> None:
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
    common.add_calibration_flags(p)  # the training text
    p.add_argument("--nsamples", type=int, default=256, help="training windows (default 256)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(validate=validate, main=main)


def validate(args) -> None:
    require_extra("peft", "recover", "LoRA recovery")
    read_subnet_record(args.export)
    check_destination(args.out)
    args.lora = LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, lr=args.lr,
                         epochs=args.epochs, batch_size=args.batch_size)
    args.calibration = common.calibration_from(args, model=str(args.export))


def main(args) -> int:
    recovery = recover_export(args.export, lora=args.lora, calibration=args.calibration, out_dir=args.out,
                              environment=environment(), progress=common.progress(args.quiet))
    losses = ", ".join(f"{x:.3f}" for x in recovery["epoch_losses"])
    print(f"recovered {args.export} -> {args.out}: epoch losses {losses}, {recovery['seconds']:.0f} s")
    return 0
