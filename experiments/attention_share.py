"""Does the split of the budget between attention and MLP matter? One shape for every layer's attention,
the MLP filling the rest of the budget.

Under the ``wide`` preset attention keeps at least half its query heads; at ratio 0.5 every start and every
winner of the staged search sits at that floor in every layer (SmolLM2: 6 of 9 heads, attention 75 % of its
parameters, MLP 42 %), and level switches cannot move it (no two layers an equal parameter step apart). This
script asks whether another split would have been better, outside the search: for every GQA-valid attention
shape ``(kv_heads, q_per_kv)``, every layer gets it and the MLP widths absorb the rest of the budget
(:func:`space.budget.project`, which keeps the shapes), two MLP profiles:

- ``uniform``: every layer's MLP as wide as the budget allows (the plainest one-shot rule);
- ``winner``: the MLP profile of a finished search's winner, scaled together (what the search found,
  with only the attention share changed).

Each candidate is scored as the search scores candidates (the run's unit order, local least squares on
the dense model's statistics, float32 here): the KL to the dense model on the run's re-scoring region (the
search's ``rescored`` value, never a test split) and PTB validation perplexity (8 windows of 2048). No test
text is read.

    LLM_PRUNER_DATA=../shared/data python experiments/attention_share.py runs/quality/0.5/long-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer

from evaluators.data import dataset_windows
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from search.cli.common import exit_status
from search.prepare import build_fitness
from search.rundir import BEST, load_run_config
from search.widths import PRESETS, default_step
from space.budget import Bounds, project
from space.errors import UserError
from space.export import write_json
from space.subnet import LayerWidths, Subnet
from space.views import subnet_view

RESULTS = Path(__file__).parent / "results"
VALIDATION = ("ptb:validation", 2048)


def with_attention(subnet: Subnet, shape: tuple[int, int], ratio: float, step: int) -> Subnet:
    """``subnet`` with every layer's attention at ``shape``, the MLP widths scaled together onto ``ratio``."""
    layers = [LayerWidths(*shape, w.channels) for w in subnet.layers]
    bounds = Bounds(step=step, low=0, allow_empty_mlp=PRESETS["full"].allow_empty_mlp, shapes=(shape,))
    return project(Subnet(subnet.dims, layers), ratio=ratio, bounds=bounds)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished search run folder (its unit order, statistics, winner)")
    parser.add_argument("--windows", type=int, default=32, help="re-scoring windows of 512 for the KL")
    parser.add_argument("--validation-windows", type=int, default=8, help="PTB validation windows of 2048")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_share.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.run / BEST).is_file():
        raise UserError(f"{args.run} is not a finished search run folder (no {BEST})")
    config = load_run_config(args.run)
    record = json.loads((args.run / BEST).read_text())
    best = record["best"]
    started = time.time()
    fitness = build_fitness(config, args.run, windows="final_windows")
    dims = fitness.adapter.dims
    winner = Subnet(dims, [LayerWidths(*w) for w in best["widths"]])
    step = config.mlp_step or default_step(dims)
    # the run's export carries the model's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(record["export"], trust_remote_code=True)
    ptb = dataset_windows(tokenizer, VALIDATION[0], seqlen=VALIDATION[1], limit=args.validation_windows)
    rows = list(range(min(args.windows, fitness.windows.shape[0])))
    uniform = Subnet.dense(dims)

    def measure(name: str, profile: str, subnet: Subnet) -> dict:
        t0 = time.time()
        kl = fitness.evaluate(subnet, rows=rows).value
        with subnet_view(fitness.adapter, subnet, fitness.overrides(subnet)) as model:
            ppl = perplexity(model, ptb)
        row = {"shape": name, "profile": profile, "heads": subnet.layers[0].heads,
               "attention_ratio": subnet.attention_ratio(), "mlp_ratio": subnet.mlp_ratio(),
               "block_ratio": subnet.ratio(), "rescored_kl": kl, "ptb_validation": ppl,
               "mlp_widths": [w.channels for w in subnet.layers], "seconds": time.time() - t0}
        print(f"{profile:8s} {name:10s} heads {row['heads']} attention {row['attention_ratio']:.3f} "
              f"mlp {row['mlp_ratio']:.3f} block {row['block_ratio']:.4f}: KL {kl:.4f}, PTB validation {ppl:.2f}",
              flush=True)
        return row

    results = [measure("winner", "winner", winner)]
    for shape in dims.attention_shapes():
        if shape == (0, 0):
            continue
        for profile, base in (("uniform", uniform), ("winner", winner)):
            if profile == "winner" and all((w.kv_heads, w.q_per_kv) == shape for w in winner.layers):
                continue  # the winner itself, measured first
            try:
                candidate = with_attention(base, shape, config.ratio, step)
            except ValueError as exc:  # attention alone over the budget
                print(f"{profile} {shape}: {exc}")
                continue
            results.append(measure(f"{shape[0]}x{shape[1]}", profile, candidate))
    data = {"command": "python experiments/attention_share.py " + " ".join(sys.argv[1:]),
            "run": str(args.run), "ratio": config.ratio, "importance": config.importance, "dtype": config.dtype,
            "rescoring_windows": len(rows), "validation": {"dataset": VALIDATION[0], "seqlen": VALIDATION[1],
                                                            "windows": args.validation_windows},
            "results": results, "seconds": time.time() - started, "environment": environment()}
    write_json(args.out, data)
    args.out.with_suffix(".md").write_text(report(data))
    return 0


def report(data: dict) -> str:
    """The table of a measurement (``data`` as written to the JSON)."""
    env = data["environment"]["machine"]
    lines = [f"# The attention/MLP split at ratio {data['ratio']} (SmolLM2-135M, one-shot, no search)", "",
             f"Command: `LLM_PRUNER_DATA=../shared/data {data['command']}` ({data['seconds']:.0f} s; {env['cpu']}, "
             f"{env['threads']} threads, scored in {data['dtype']}).", "",
             f"Every layer's attention at one GQA shape, the MLP filling the rest of the budget: `uniform` (every "
             f"layer's MLP alike) or `winner` (the MLP profile of {data['run']}'s winner, scaled together). Scored as "
             f"the search scores candidates ({data['importance']} unit order, local least squares on the dense "
             f"statistics): KL to the dense model on the run's first {data['rescoring_windows']} re-scoring windows "
             f"of 512 (the `re-scored` value of quality.md; no test split) and {data['validation']['dataset']} "
             f"perplexity ({data['validation']['windows']} windows of {data['validation']['seqlen']}).", "",
             "| MLP profile | attention shape (KV x q) | heads | attention kept | MLP kept | re-scored KL | PTB valid |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(data["results"], key=lambda r: (r["profile"] != "winner" or r["shape"] != "winner",
                                                      r["profile"], r["attention_ratio"], r["shape"])):
        lines.append(f"| {r['profile']} | {r['shape']} | {r['heads']} | {r['attention_ratio']:.3f} | "
                     f"{r['mlp_ratio']:.3f} | {r['rescored_kl']:.4f} | {r['ptb_validation']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(exit_status(main))
