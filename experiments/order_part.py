"""The unit order's own part in a winner's quality: one search's winner (its widths, from its export) exported
again with the unit order of other run folders, each rectified as that folder's export is (its least squares,
its text and windows), and measured on PTB validation (8 windows of 2048, float32), the text decisions are read
from. The same widths under two orders tell the order's part from the search's path to the widths.

    LLM_PRUNER_DATA=../shared/data python experiments/order_part.py \\
        runs/quality/0.5/order256-orderseed2-seed0/export \\
        --orders runs/quality/0.5/order256-even-seed0 runs/quality/0.5/order256-orderseed0-seed2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.outputs import command_line  # noqa: E402
from experiments.quality import validation_ppl  # noqa: E402
from search.finalize import export_winner  # noqa: E402
from search.rundir import load_run_config  # noqa: E402
from space.export import read_subnet_record, write_json  # noqa: E402
from space.subnet import Subnet  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def cell(widths_export: Path, order_run: Path) -> dict:
    record = read_subnet_record(widths_export)
    subnet = Subnet.from_dict(record["subnet"])
    config = load_run_config(order_run)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="order_part_") as tmp:
        export_winner(subnet, record["recipe"]["trial"], config, order_run, out_dir=Path(tmp) / "export")
        seconds = time.time() - started
        validation = validation_ppl(str(Path(tmp) / "export"))
    return {"widths": str(widths_export), "order_run": str(order_run),
            "order_windows": config.order_calibration_spec().to_dict(),
            "export_windows": config.export_calibration_spec().to_dict(), "export_s": round(seconds, 1),
            "ptb_validation": validation}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("widths_export", type=Path, help="the export whose widths are kept")
    parser.add_argument("--orders", type=Path, nargs="+", required=True, help="run folders whose unit order is used")
    parser.add_argument("--out", type=Path, default=RESULTS / "order_part.json")
    args = parser.parse_args(argv)
    cells = json.loads(args.out.read_text())["cells"] if args.out.is_file() else []
    for order_run in args.orders:
        cells.append(cell(args.widths_export, order_run))
        print(json.dumps(cells[-1]), flush=True)
        write_json(args.out, {"command": command_line(__file__, argv), "cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
