"""How the export's least squares should be fitted: a search's winner rectified again from the dense
model with N windows of 512 tokens and a least-squares mode (the same text, region and seed as the
search's export; only N and, with ``--modes``, ``--pass-dtypes``, ``--selects``, ``--calib`` or
``--seqlens``, the mode, the dtype of the upstream mode's calibration passes, the kept units, the text
or the windows' length change), measured like quality.md's cells.

Decisions read PTB validation (never a test split); WikiText-2 test, PTB test and c4:heldout (32 x
2048, float32) are reported beside it. N = the search's own count reproduces its export (a check).

    LLM_PRUNER_DATA=../shared/data python experiments/calibration_size.py \\
        runs/quality/0.7/staged-seed0/export runs/quality/0.5/tyr-seed0/export --nsamples 64 256
    LLM_PRUNER_DATA=../shared/data python experiments/calibration_size.py \\
        runs/quality/0.7/staged-seed0/export --nsamples 64 --modes upstream residual
    LLM_PRUNER_DATA=../shared/data python experiments/calibration_size.py \
        runs/quality/0.5/final-seed0/export --nsamples 256 --pass-dtypes bfloat16
    LLM_PRUNER_DATA=../shared/data python experiments/calibration_size.py \
        runs/quality/0.5/final-seed0/export --nsamples 256 --dampings 1e-2 --ridges zero dense
    LLM_PRUNER_DATA=../shared/data python experiments/calibration_size.py \
        runs/quality/0.6/last8-seed0/export --nsamples 64 --seqlens 2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from evaluators.suite import evaluate  # noqa: E402
from experiments.quality import EVAL, VALIDATION, zeroshot_cell  # noqa: E402
from reform.lstsq import DEFAULT_DAMPING, RIDGES  # noqa: E402
from reform.spec import MODES, PASS_DTYPES, SELECTIONS, ReformSpec  # noqa: E402
from search.cli.common import exit_status, parse_args_with_config  # noqa: E402
from search.oneshot import reform_export  # noqa: E402
from space.errors import UserError  # noqa: E402
from space.export import read_subnet_record, write_json  # noqa: E402
from space.models import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHORT_SEQLEN = 128  # compare.md's short windows (compare.py --short-seqlen)


def measure(export: Path) -> dict:
    loaded = load_model(str(export), dtype=torch.float32, trust_remote_code=True)
    test = evaluate(loaded.model, loaded.tokenizer, ppl=list(EVAL), seqlen=2048, limit=32)["ppl"]
    validation = evaluate(loaded.model, loaded.tokenizer, ppl=[VALIDATION[0]], seqlen=2048, limit=VALIDATION[1])
    # WikiText-2 test's same tokens in windows of 128 (compare.md's short windows): where a longer context
    # in the calibration could cost what a short one keeps
    short = evaluate(loaded.model, loaded.tokenizer, ppl=["wikitext2"], seqlen=SHORT_SEQLEN,
                     limit=32 * 2048 // SHORT_SEQLEN)["ppl"]["wikitext2"]
    return {"validation": validation["ppl"][VALIDATION[0]], **test, f"wikitext2_{SHORT_SEQLEN}": short}


def cell(export: Path, nsamples: int, calib: str | None = None, zeroshot: int | None = None,
         seqlen: int | None = None, seed: int | None = None, **changed) -> dict:
    """The winner of ``export`` refitted on ``nsamples`` windows of ``seqlen`` tokens (None: the export's
    own length) drawn with ``seed`` (None: the export's own draw); the :class:`ReformSpec` fields in
    ``changed`` that are not None (mode, pass_dtype, select, damping, ridge) and the text ``calib``
    (sources joined by ``+``, each from the search's region) replace the export's own. ``zeroshot``: also
    the seven tasks' zero-shot accuracy on their first ``zeroshot`` questions."""
    record = read_subnet_record(export)
    recipe = record["recipe"]
    if changed.get("select") == "prefix" and recipe["compensation"].get("select", "prefix") != "prefix":
        # the refit starts from the export's kept units, which its own selection chose: their prefix is that set
        raise UserError(f"{export}: its units were re-selected ({recipe['compensation']['select']}); a prefix refit "
                        "would keep the same units (the search's unit order is not in the export)")
    own = search_export(export, recipe)  # before the refit: a later search may re-run into the same folder
    source = CalibrationSpec.from_dict(recipe["calibration"])
    calibration = CalibrationSpec(calib or source.dataset, nsamples, seqlen or source.seqlen,
                                  source.seed if seed is None else seed, source.region)
    reform = ReformSpec(**{**recipe["compensation"], **{k: v for k, v in changed.items() if v is not None}})
    loaded = load_model(record["source"]["path"], dtype=torch.float32)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="calibration_size_") as tmp:
        reform_export(loaded, record, reform=reform, calibration=calibration, out_dir=Path(tmp) / "export",
                      reformed_from=str(export))
        seconds = time.time() - started
        del loaded
        values = measure(Path(tmp) / "export")
        if zeroshot:
            values["zeroshot"] = zeroshot_cell(str(Path(tmp) / "export"), zeroshot)
    return {"export": str(export), "nsamples": nsamples, "tokens": nsamples * calibration.seqlen,
            "reform": reform.to_dict(), "calibration": calibration.to_dict(), "reform_s": round(seconds, 1),
            "ratio": record["target_ratio"], "search": own, **({"drawn": True} if seed is not None else {}), **values}


def search_export(export: Path, recipe: dict) -> dict | None:
    """The search's own export of this winner as quality.json measured it and how its least squares
    was fitted (``recipe``, its subnet record's): stored in the cell, since a search re-run later
    into the same folder replaces both the export and quality.json's figures."""
    quality = RESULTS / "quality.json"
    cells = json.loads(quality.read_text())["cells"].values() if quality.is_file() else []
    own = next((c for c in cells if Path(c["export"]).resolve() == export.resolve()), None)
    if own is None:
        return None
    fitted = recipe.get("export_calibration", recipe["calibration"])  # (older runs: the statistics')
    return {"mode": recipe["compensation"]["mode"], "text": fitted["dataset"], "windows": fitted["nsamples"],
            "ppl": own["ppl"], "export_s": own["seconds"].get("export")}


def least_squares(reform: dict) -> str:
    """A cell's least squares as the table names it: the mode, then what differs from the defaults."""
    parts = [reform["mode"]]
    if "pass_dtype" in reform:
        parts.append(f"{reform['pass_dtype']} passes")
    if "select" in reform:
        parts.append(f"{reform['select']} units")
    if reform.get("damping", DEFAULT_DAMPING) != DEFAULT_DAMPING:
        parts.append(f"damping {reform['damping']:g}")
    if "ridge" in reform:
        parts.append(f"ridge toward {reform['ridge']}")
    return ", ".join(parts)


def report(data: dict) -> str:
    lines = ["# The export's least squares: how many calibration windows, which mode, text and pass dtype (SmolLM2-135M)", "",
             __doc__.split("\n\n")[0].replace("\n", " "), "",
             f"Machine: {data['environment']['machine']['cpu']}, {data['environment']['machine']['threads']} threads, "
             f"bf16 peak {data['bf16_tflops']:.2f} TFLOP/s at the start of the last run (other jobs shared the 2 cores: rectify s "
             "is not an idle figure). Rows marked `search` are the search's own exports (quality.json).", "",
             "| export | ratio | least squares | text | windows x tokens | PTB valid (8) | WikiText-2 | "
             f"WikiText-2 in windows of {SHORT_SEQLEN} | PTB | c4:heldout | rectify s | zero-shot avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shown = set()
    for c in data["cells"].values():
        own = c.get("search")
        if own is not None and (c["export"], own["ppl"]["wikitext2"]) not in shown:  # once per export as measured
            shown.add((c["export"], own["ppl"]["wikitext2"]))
            p, seconds = own["ppl"], own["export_s"]
            lines.append(f"| {c['export']} | {c['ratio']} | {own['mode']} (search) | {own['text']} | {own['windows']} | "
                         f"{p['ptb:validation']:.2f} | {p['wikitext2']:.2f} | – | {p['ptb']:.2f} | {p['c4:heldout']:.2f} | "
                         f"{'–' if seconds is None else f'{seconds:.0f}'} | – |")
        short = c.get(f"wikitext2_{SHORT_SEQLEN}")  # (cells measured before it was: –)
        drawn = f" (seed {c['calibration']['seed']})" if c.get("drawn") else ""
        lines.append(f"| {c['export']} | {c['ratio']} | {least_squares(c['reform'])} | {c['calibration']['dataset']}{drawn} | "
                     f"{c['nsamples']} x {c['calibration']['seqlen']} | {c['validation']:.2f} | {c['wikitext2']:.2f} | "
                     f"{'–' if short is None else f'{short:.2f}'} | {c['ptb']:.2f} | {c['c4:heldout']:.2f} | "
                     f"{c['reform_s']:.0f} | "
                     + (f"{c['zeroshot']['scores']['average']:.3f} |" if "zeroshot" in c else "– |"))
    notes = RESULTS / "calibration_size.notes.md"
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", type=Path, nargs="*", default=[])
    parser.add_argument("--nsamples", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=[None],
                        help="least-squares modes to refit with (default: the search's export's own)")
    parser.add_argument("--pass-dtypes", nargs="+", choices=PASS_DTYPES, default=[None],
                        help="upstream mode: the dtypes its calibration passes run in (default: the export's own)")
    parser.add_argument("--selects", nargs="+", choices=SELECTIONS, default=[None],
                        help="upstream mode: the kept units (default: the export's own, the order's prefix)")
    parser.add_argument("--dampings", type=float, nargs="+", default=[None],
                        help="the least squares' ridge, relative to mean(diag XᵀX) (default: the export's own)")
    parser.add_argument("--ridges", nargs="+", choices=RIDGES, default=[None],
                        help="what the ridge pulls toward: zero or the dense kept weights (default: the export's own)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[None],
                        help="the refit's window length in tokens (default: the export's own, 512)")
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[None],
                        help="draw the windows with these seeds (default: the export's own draw): how much of a "
                             "winner's figures the calibration draw alone moves")
    parser.add_argument("--calib", nargs="+", default=[None],
                        help="the texts to refit on, each sources joined by + (default: the search's own)")
    parser.add_argument("--zeroshot", type=int, metavar="LIMIT",
                        help="also the zero-shot accuracy (seven tasks, first LIMIT questions each; a cell measured "
                             "without it is refitted again)")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_size.json")
    parser.add_argument("--report", action="store_true", help="only write the .md from the JSON")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    return exit_status(lambda: run(parse_args(argv)))


def run(args) -> int:
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"cells": {}}
    if args.report:
        args.out.with_suffix(".md").write_text(report(data))
        return 0
    data["bf16_tflops"] = matmul_tflops(torch.bfloat16)
    for export in args.exports:
        for n, mode, pass_dtype, calib, select, damping, ridge, seqlen, seed in itertools.product(
                args.nsamples, args.modes, args.pass_dtypes, args.calib, args.selects, args.dampings, args.ridges,
                args.seqlens, args.calib_seeds):
            # the export's own settings leave the key as the first cells' were
            key = f"{export}:{n}" + "".join(f":{v}" for v in (mode, pass_dtype, calib, select) if v) \
                + (f":damping={damping:g}" if damping is not None else "") + (f":ridge={ridge}" if ridge else "") \
                + (f":seqlen={seqlen}" if seqlen else "") + (f":seed={seed}" if seed is not None else "")
            if key not in data["cells"] or (args.zeroshot and "zeroshot" not in data["cells"][key]):
                data["cells"][key] = cell(export, n, calib, args.zeroshot, seqlen, seed, mode=mode,
                                          pass_dtype=pass_dtype, select=select, damping=damping, ridge=ridge)
                data["environment"] = environment()
                write_json(args.out, data)
    args.out.with_suffix(".md").write_text(report(data))
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
