"""Reformation on SmolLM2-135M: none / bias / lstsq-local / lstsq-sequential / admm at kept ratios
0.9 ... 0.5, with 32 and 128 reformation calibration windows of 512 tokens (WikiText-2 validation).

    LLM_PRUNER_DATA=../shared/data nohup .venv/bin/python experiments/reform_table.py \\
        > runs/reform_table.log 2>&1 &

Subnets: ``wanda-sp`` importance on 64 x 512 validation tokens (seed 0), allocation
``uniform-mlp`` (attention whole, the same MLP width in every layer). Every cell is evaluated in
process through ``subnet_view(..., overrides)``, which tests/test_reform.py proves equal to the
reloaded export. Perplexity: WikiText-2 test, the first 8 windows of 2048 tokens, bfloat16
(the model permuted and rectified in float32, then cast), plus float32 spot checks.

Local methods share one dense calibration pass per sample count: the statistics are cached and
every ratio is solved from them (:func:`reform.local.stats_overrides`). The wall time and peak
memory of a local method are those of the streamed driver (:func:`reform.rectify.rectify`), run
afterwards at ratio 0.7 for the cells ``--driver-timing`` names, its result checked equal to the
cached path's.
Sequential reformation is run by the driver for every cell. Peak memory = highest resident set
size during the reformation minus the resident size before it (sampled every 20 ms, freed heap
returned to the system first).

Writes ``experiments/results/reform.json`` (config, versions, seed, wall times, every cell) after
every cell, and ``reform.md``. Re-running resumes: cells already in the JSON are kept.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import shlex
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from evaluators.data import CalibrationSpec, dataset_windows  # noqa: E402
from evaluators.environment import environment  # noqa: E402
from evaluators.perplexity import perplexity  # noqa: E402
from reform.local import output_stats, stats_overrides  # noqa: E402
from reform.spec import METHODS  # noqa: E402
from reform.rectify import ReformSpec, rectify  # noqa: E402
from search.oneshot.allocation import allocate  # noqa: E402
from search.cli.common import parse_args_with_config  # noqa: E402
from search.prepare import dense_scores
from space.order import order_model  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.views import subnet_view  # noqa: E402
from space.subnet import Subnet  # noqa: E402

log = logging.getLogger("reform_table")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": ReformSpec("none", "local"),
    "bias": ReformSpec("bias", "local"),
    "lstsq-local": ReformSpec("lstsq", "local"),
    "lstsq-sequential": ReformSpec("lstsq", "sequential"),
    "admm": ReformSpec("admm", "local"),
}
TIMING_RATIO = 0.7
PRIORITY = [0.7, 0.5, 0.8, 0.6, 0.9]


class PeakMemory:
    """Peak resident memory above the starting level while the block runs, in MiB."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.time()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.mib = (self.peak - self.start) / 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--nsamples", type=int, nargs="+", default=[32, 128],
                   help="reformation calibration windows (run in the reverse order: the largest first)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--importance", default="wanda-sp")
    p.add_argument("--allocation", default="uniform-mlp")
    p.add_argument("--importance-nsamples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=8, help="first N WikiText-2 test windows")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--fp32-checks", nargs="*", default=["0.7:lstsq-local:128", "0.5:none:0"],
                   help="cells (ratio:variant:nsamples) re-evaluated in float32")
    p.add_argument("--driver-timing", nargs="*",
                   default=["bias:32", "lstsq-local:32", "admm:32", "lstsq-local:128"],
                   help="local cells (variant:nsamples) also run through the streamed driver, timed")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "reform")
    p.add_argument("--scores-cache", type=Path, default=ROOT / "runs" / "reform_table" / "importance.pt")
    return parse_args_with_config(p, argv)


def cell_key(ratio: float, variant: str, nsamples: int) -> str:
    return f"{ratio}:{variant}:{nsamples}"


class Table:
    """The result file, saved (JSON + Markdown) after every cell."""

    def __init__(self, out: Path, config: dict):
        self.out = out
        path = out.with_suffix(".json")
        previous = json.loads(path.read_text()) if path.is_file() else {}
        same = previous.get("config") == config
        if previous and not same:
            log.warning("%s was made with another config: starting afresh", path)
        self.data = previous if same else {"config": config, "cells": {}, "timing": {}, "fp32": {}}
        self.data["environment"] = environment()
        self.started = time.time()
        self.seconds_before = self.data.get("wall_seconds", 0.0)

    def save(self) -> None:
        self.data["wall_seconds"] = round(self.seconds_before + time.time() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.out.with_suffix(".json"), self.data)
        text = render(self.data)
        notes = self.out.with_suffix(".notes.md")  # hand-written findings, kept across re-runs
        if notes.is_file():
            text += "\n" + notes.read_text(encoding="utf-8")
        self.out.with_suffix(".md").write_text(text, encoding="utf-8")


def evaluate(adapter, subnet, overrides, windows, dtype) -> tuple[float, float]:
    started = time.time()
    cast = {k: v.to(dtype) for k, v in overrides.items()}
    with subnet_view(adapter, subnet, cast) as model:
        value = perplexity(model, windows)
    return value, round(time.time() - started, 1)


def build_config(args) -> dict:
    """Everything the numbers depend on (a result file made with another config is not resumed)."""
    return {
        "model": args.model, "ratios": args.ratios, "nsamples": args.nsamples,
        "variants": {name: VARIANTS[name].to_dict() for name in args.variants},
        "importance": args.importance, "allocation": args.allocation,
        "importance_calibration": CalibrationSpec("wikitext2", args.importance_nsamples, args.calib_seqlen,
                                                  args.seed).to_dict(),
        "reform_calibration": {"dataset": "wikitext2", "split": "validation", "seqlen": args.calib_seqlen,
                               "seed": args.seed},
        "evaluation": {"dataset": "wikitext2", "split": "test", "seqlen": args.seqlen, "windows": args.windows,
                       "dtype": "bfloat16", "fp32_checks": args.fp32_checks},
        "timing_ratio": TIMING_RATIO, "driver_timing": args.driver_timing,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    config = build_config(args)
    table = Table(args.out, config)
    table.data["command"] = "LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/reform_table.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    cells, timing = table.data["cells"], table.data["timing"]

    loaded = load_model(args.model, dtype=torch.float32)
    table.data["source"] = loaded.source.to_dict()
    adapter = adapter_for(loaded.model)
    calibration = CalibrationSpec("wikitext2", args.importance_nsamples, args.calib_seqlen, args.seed)
    args.scores_cache.parent.mkdir(parents=True, exist_ok=True)
    scores = dense_scores(loaded, [args.importance], calibration, copy_to=args.scores_cache).scores
    _, ordered = order_model(adapter, scores[args.importance])
    subnets = {r: allocate(args.allocation, adapter.dims, ordered, ratio=r) for r in args.ratios}
    table.data["subnets"] = {str(r): {"block_ratio": s.ratio(), "total_ratio": s.total_ratio(),
                                      "channels": s.layers[0].channels} for r, s in subnets.items()}
    model16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    adapter16 = adapter_for(model16)
    test = dataset_windows(loaded.tokenizer, "wikitext2", seqlen=args.seqlen, limit=args.windows)

    if "dense" not in table.data:
        value, seconds = evaluate(adapter16, Subnet.dense(adapter.dims), {}, test, torch.bfloat16)
        table.data["dense"] = {"ppl": value, "eval_seconds": seconds}
        table.save()

    def record(ratio, variant, nsamples, overrides, reform):
        value, seconds = evaluate(adapter16, subnets[ratio], overrides, test, torch.bfloat16)
        cells[cell_key(ratio, variant, nsamples)] = {
            "ratio": ratio, "variant": variant, "nsamples": nsamples, "ppl": value, "eval_seconds": seconds,
            "reform": reform,
        }
        log.info("ratio %s %s (%d windows): ppl %.3f", ratio, variant, nsamples, value)
        table.save()

    for ratio in args.ratios:
        if "none" in args.variants and cell_key(ratio, "none", 0) not in cells:
            record(ratio, "none", 0, {}, None)

    # Most informative first (the table takes many hours on shared cores): per sample count, the
    # ratios in PRIORITY order, each with every method, so local vs sequential is known early.
    chosen = [v for v in ["lstsq-local", "lstsq-sequential", "bias", "admm"] if v in args.variants]
    middle_out = sorted(args.ratios, key=lambda r: PRIORITY.index(r) if r in PRIORITY else len(PRIORITY))
    for nsamples in sorted(args.nsamples, reverse=True):
        windows = CalibrationSpec("wikitext2", nsamples, args.calib_seqlen, args.seed).windows(loaded.tokenizer)
        stats = None
        for ratio in middle_out:
            for variant in chosen:
                key = cell_key(ratio, variant, nsamples)
                if key in cells:
                    continue
                spec = VARIANTS[variant]
                if spec.mode == "sequential":
                    with PeakMemory() as peak:
                        overrides = rectify(adapter, subnets[ratio], windows, spec=spec)
                    reform = {"seconds": round(peak.seconds, 1), "peak_mib": round(peak.mib, 1), "path": "driver"}
                    timing[key] = reform
                else:
                    if stats is None:
                        with PeakMemory() as peak:
                            stats = list(output_stats(adapter, windows, gram=True))
                        timing[f"stats-pass:{nsamples}"] = {"seconds": round(peak.seconds, 1),
                                                           "peak_mib": round(peak.mib, 1), "path": "cached"}
                    started = time.time()
                    overrides = stats_overrides(adapter, subnets[ratio], stats, spec=spec)
                    reform = {"solve_seconds": round(time.time() - started, 2), "path": "cached-stats"}
                record(ratio, variant, nsamples, overrides, reform)
        del stats

    # The streamed driver of the local methods, timed, and checked equal to the cached path.
    for item in args.driver_timing:
        variant, nsamples = item.split(":")
        nsamples = int(nsamples)
        key = cell_key(TIMING_RATIO, variant, nsamples)
        if key in timing or TIMING_RATIO not in subnets:
            continue
        windows = CalibrationSpec("wikitext2", nsamples, args.calib_seqlen, args.seed).windows(loaded.tokenizer)
        with PeakMemory() as peak:
            driven = rectify(adapter, subnets[TIMING_RATIO], windows, spec=VARIANTS[variant])
        stats = list(output_stats(adapter, windows, gram=METHODS[VARIANTS[variant].method].gram))
        cached = stats_overrides(adapter, subnets[TIMING_RATIO], stats, spec=VARIANTS[variant])
        del stats
        same = driven.keys() == cached.keys() and all(torch.equal(driven[k], cached[k]) for k in driven)
        if not same:
            log.warning("driver and cached path differ for %s", key)
        timing[key] = {"seconds": round(peak.seconds, 1), "peak_mib": round(peak.mib, 1), "path": "driver",
                       "equal_to_cached": same}
        table.save()

    for check in args.fp32_checks:
        if check in table.data["fp32"]:
            continue
        ratio, variant, nsamples = check.split(":")
        ratio, nsamples = float(ratio), int(nsamples)
        overrides = {}
        if variant != "none":
            windows = CalibrationSpec("wikitext2", nsamples, args.calib_seqlen, args.seed).windows(loaded.tokenizer)
            overrides = rectify(adapter, subnets[ratio], windows, spec=VARIANTS[variant])
        value, seconds = evaluate(adapter, subnets[ratio], overrides, test, torch.float32)
        table.data["fp32"][check] = {"ppl": value, "eval_seconds": seconds,
                                     "bf16_ppl": cells.get(cell_key(ratio, variant, nsamples), {}).get("ppl")}
        table.save()
    table.save()
    return 0


# --- report ----------------------------------------------------------------------------------


def render(data: dict) -> str:
    cfg, cells, timing = data["config"], data["cells"], data.get("timing", {})
    ratios = cfg["ratios"]
    lines = [
        "# Reformation on SmolLM2-135M",
        "",
        f"WikiText-2 **test** perplexity, first {cfg['evaluation']['windows']} windows of "
        f"{cfg['evaluation']['seqlen']} tokens, evaluated in **bfloat16** (rectified in float32, then cast). "
        f"Subnets: importance `{cfg['importance']}` on {cfg['importance_calibration']['nsamples']} x "
        f"{cfg['importance_calibration']['seqlen']} validation tokens, allocation `{cfg['allocation']}` "
        "(attention whole, the same MLP width in every layer). Reformation calibration: N windows x "
        f"{cfg['reform_calibration']['seqlen']} tokens of WikiText-2 **validation**, seed {cfg['reform_calibration']['seed']}. "
        "lstsq damping 1e-4 x mean(diag C); ADMM 30 iterations, rho = 1 x mean(diag C), same damping.",
        "",
    ]
    if "dense" in data:
        lines += [f"Dense model, same evaluation: **{data['dense']['ppl']:.2f}**.", ""]
    header = "| method | N | " + " | ".join(f"{r}" for r in ratios) + " |"
    lines += [header, "|---|---|" + "---|" * len(ratios)]
    for variant in cfg["variants"]:
        for n in ([0] if variant == "none" else cfg["nsamples"]):
            row = []
            for r in ratios:
                cell = cells.get(cell_key(r, variant, n))
                row.append(f"{cell['ppl']:.2f}" if cell else "–")
            lines.append(f"| {variant} | {n or '–'} | " + " | ".join(row) + " |")
    subnets = data.get("subnets", {})
    if subnets:
        lines += ["", "Block ratio / MLP channels per layer (of 1536): " + ", ".join(
            f"{r}: {v['block_ratio']:.4f} / {v['channels']}" for r, v in subnets.items()) + "."]
    lines += ["", "Sequential vs local least squares (perplexity ratio; below 1: sequential better):", "",
              "| N | " + " | ".join(f"{r}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for n in cfg["nsamples"]:
        row = []
        for r in ratios:
            seq, loc = cells.get(cell_key(r, "lstsq-sequential", n)), cells.get(cell_key(r, "lstsq-local", n))
            row.append(f"{seq['ppl'] / loc['ppl']:.3f}" if seq and loc else "–")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    if data.get("fp32"):
        lines += ["", "Float32 spot checks (same cells, evaluated in float32):", "",
                  "| cell (ratio:method:N) | float32 | bfloat16 |", "|---|---|---|"]
        for key, value in data["fp32"].items():
            bf16 = f"{value['bf16_ppl']:.2f}" if value.get("bf16_ppl") else "–"
            lines.append(f"| {key} | {value['ppl']:.2f} | {bf16} |")
    if timing or cells:
        lines += ["", "Cost of each reformation on this machine (2 shared CPU cores, float32): wall seconds and peak "
                  "resident memory above the loaded model. *Driver*: the streamed `rectify()` (one block's "
                  f"statistics at a time), at ratio {cfg['timing_ratio']}. *Cached*: one dense pass keeping all "
                  "layers' statistics, then a solve per ratio (what this table used for the local methods).", "",
                  "| method | N | ratio | driver s | driver peak MiB | cached: pass s + solve s |",
                  "|---|---|---|---|---|---|"]
        for variant in cfg["variants"]:
            if variant == "none":
                continue
            for n in cfg["nsamples"]:
                sequential = cfg["variants"][variant]["mode"] == "sequential"
                for r in (ratios if sequential else [cfg["timing_ratio"]]):
                    key = cell_key(r, variant, n)
                    driver = timing.get(key, {})
                    solves = [c["reform"]["solve_seconds"] for c in cells.values()
                              if c["variant"] == variant and c["nsamples"] == n and c["reform"]
                              and "solve_seconds" in c["reform"]]
                    stats_pass = timing.get(f"stats-pass:{n}", {}).get("seconds")
                    cached = (f"{stats_pass} + {max(solves):.1f}" if solves and stats_pass is not None else "–")
                    lines.append(f"| {variant} | {n} | {r if sequential else str(r) + ' (any)'} | "
                                 f"{driver.get('seconds', '–')} | {driver.get('peak_mib', '–')} | "
                                 f"{'–' if sequential else cached} |")
    lines += ["", f"Wall time of the whole table: {data.get('wall_seconds', 0) / 3600:.1f} h. "
              f"Reproduce: `{data.get('command', 'LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/reform_table.py')}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
