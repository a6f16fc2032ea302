"""Unit orders and reformation modes under the same one-shot pipeline: which order's prefixes, refitted
how, keep the most quality.

For each ratio and order (importance score), SmolLM2-135M is pruned one-shot with attention whole
and one MLP width in every layer (uniform-mlp), its o_proj/down_proj refitted by local least
squares, and measured in float32 on the first windows of 2048 tokens of WikiText-2 test, PTB test
and the held-out half of the local C4 sample (c4:heldout, documents 501-1000). Scores and least
squares use WikiText-2 validation windows (64 x 512 for the scores, 128 x 512 for the refit), never
a test or held-out split. ``--reform-modes``: local (statistics of the dense model) and/or upstream
(statistics from the pruned upstream model, Týr's reconstruction); ``--intercepts on``: their least
squares with an intercept (a bias on o_proj/down_proj). New cells also measure PTB validation (8 windows), the
text decisions are read from. Resumable: cells already in the JSON are kept.

    LLM_PRUNER_DATA=../shared/data python experiments/orders.py --ratios 0.7 0.5 \\
        --orders wanda-sp obs-elimination --windows 32
    LLM_PRUNER_DATA=../shared/data python experiments/orders.py --ratios 0.7 0.5 \\
        --orders wanda-sp --reform-modes upstream --windows 32
    LLM_PRUNER_DATA=../shared/data python experiments/orders.py --config experiments/configs/orders/intercept.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

import evaluators
import search
import space
from evaluators.environment import environment
from reform import ReformSpec
from search.cli.common import parse_args_with_config
from space.export import write_json

RESULTS = Path(__file__).parent / "results"
DATASETS = ["wikitext2", "ptb", "c4:heldout"]
VALIDATION = ("ptb:validation", 8)  # for decisions (never a test split): 8 windows of 2048


def cell(ratio: float, order: str, windows: int, mode: str = "local", intercept: bool = False) -> dict:
    loaded = space.load_model("smollm2-135m", dtype=torch.float32)
    started = time.time()
    pruned = search.prune(loaded, ratio=ratio, importance=order, allocation="uniform-mlp",
                          reform=ReformSpec("lstsq", mode, intercept=intercept),
                          calibration=evaluators.CalibrationSpec("wikitext2", 64, 512, 0),
                          reform_calibration=evaluators.CalibrationSpec("wikitext2", 128, 512, 0))
    prune_seconds = time.time() - started
    with space.subnet_view(pruned.adapter, pruned.subnet, pruned.overrides) as model:
        result = evaluators.evaluate(model, loaded.tokenizer, ppl=DATASETS, seqlen=2048, limit=windows)
        validation = evaluators.evaluate(model, loaded.tokenizer, ppl=[VALIDATION[0]], seqlen=2048,
                                         limit=VALIDATION[1])
    return {"ratio": ratio, "order": order, "reform_mode": mode, "intercept": intercept,
            "block_ratio": pruned.subnet.ratio(), "ppl": {**result["ppl"], **validation["ppl"]},
            "windows": result["windows"], "seconds": {"prune": round(prune_seconds, 1),
                                                       "importance": pruned.record["seconds"]["importance"],
                                                       "eval": result["seconds"]["total"]}}


def report(data: dict) -> str:
    lines = ["# Unit orders and least-squares modes under one-shot pruning (SmolLM2-135M)", "",
             "Attention whole, one MLP width everywhere, o_proj/down_proj refitted by least squares on 128 x 512 "
             "WikiText-2 validation tokens (local: statistics of the dense model; upstream: of the pruned upstream "
             "model, the layer's own weights as target); scores on 64 x 512. Times: score s is what computing the "
             "scores took (reused from the cache after the first ratio), prune s the wall time of the cell on a "
             "shared machine (other jobs ran beside the first cells). Perplexity in float32 on the "
             f"first {data['windows']} windows of 2048 of each text. Commands:", "",
             *[f"    {c}" for c in data["commands"]], "",
             "| ratio | order | least squares | PTB validation | WikiText-2 test | PTB test | C4 held-out | score s "
             "| prune s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fit(c: dict) -> str:
        return c.get("reform_mode", "local") + (" + intercept" if c.get("intercept") else "")

    for c in sorted(data["cells"].values(), key=lambda c: (-c["ratio"], c["order"], fit(c))):
        p = c["ppl"]
        valid = f"{p[VALIDATION[0]]:.2f}" if VALIDATION[0] in p else "–"
        lines.append(f"| {c['ratio']} | {c['order']} | {fit(c)} | {valid} | {p['wikitext2']:.2f} | "
                     f"{p['ptb']:.2f} | {p['c4:heldout']:.2f} | "
                     f"{c['seconds']['importance']:.0f} | {c['seconds']['prune']:.0f} |")
    env = data["environment"]["machine"]
    lines += ["", f"Machine: {env['cpu']}, {env['threads']} threads; {data['environment']['git_commit']}.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--orders", nargs="+", default=["wanda-sp", "obs-elimination"])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--reform-modes", nargs="+", default=["local"], help="local | upstream | sequential")
    parser.add_argument("--intercepts", nargs="+", choices=["off", "on"], default=["off"],
                        help="least squares without and/or with an intercept (local, upstream)")
    parser.add_argument("--out", type=Path, default=RESULTS / "orders")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    path = args.out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    command = "LLM_PRUNER_DATA=../shared/data python experiments/orders.py " + " ".join(sys.argv[1:])
    data.update(windows=args.windows, environment=environment())
    data["commands"] = list(dict.fromkeys(data.get("commands", [data.get("command")] if "command" in data else [])
                                          + [command]))
    for ratio in args.ratios:
        for order in args.orders:
            for mode, intercept in itertools.product(args.reform_modes, args.intercepts):
                key = (f"{order}/{ratio}/{args.windows}" + ("" if mode == "local" else f"/{mode}")
                       + ("/intercept" if intercept == "on" else ""))
                if key in data["cells"]:
                    continue
                data["cells"][key] = cell(ratio, order, args.windows, mode, intercept == "on")
                write_json(path, data)
                print(key, data["cells"][key]["ppl"], flush=True)
    args.out.with_suffix(".md").write_text(report(data))


if __name__ == "__main__":
    main()
