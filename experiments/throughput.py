"""Where a candidate's time goes, and what starting a child where it differs from earlier candidates
buys (issue 15, item 4; ``search.fitness.PrefixStates``).

SmolLM2-135M permuted by wanda-sp, the fitness's float32 prefix solvers (``L⁻¹``, ``P``), the model
in the scoring dtype (``--dtype``: bfloat16 as first measured; ``auto`` is the search's default, float32
on a CPU without AVX-512), as a search worker holds them. Candidates: the staged evolution's children (level
switches of one incumbent at ``--ratio``, two to six switches each, MLP quantum 4 grid steps), scored
in order, as a generation is. Each child is scored twice per setting, interleaved so that both
settings see the same machine load: its least-squares solves (the layers no earlier candidate had),
then its forward passes on the fitness windows — once with every pass whole, once with kept hidden
states. Two fitness-window settings: the staged evolution's first stage (1 x 512 tokens) and the
plain evolution's fitness (8 x 512).

Achieved TFLOP/s = the work of a whole pass (the blocks at the child's widths, attention included,
the LM head; ``Subnet.flops_per_token``) / seconds, beside the matmul peak of the scoring dtype on this
machine measured in the same run; the solves' FLOPs (2 k² d_out per projection and layer solved) over their
own seconds, beside the float32 peak.

    LLM_PRUNER_DATA=../shared/data python experiments/throughput.py --children 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from experiments.outputs import command_line, write_results  # noqa: E402
from experiments.fitness_rank import permuted_smollm2  # noqa: E402
from reform.local import output_solvers  # noqa: E402
from search.cli.common import parse_args_with_config  # noqa: E402
from search.config import FITNESS_REGION, SearchConfig  # noqa: E402
from search.defaults import default_dtype  # noqa: E402
from search.fitness import PREFIX_BYTES, Fitness  # noqa: E402
from search.prepare import PREFIX_ONLY, starts_for  # noqa: E402
from search.samplers.levels import LevelSwitches  # noqa: E402
from search.widths import WidthSpace  # noqa: E402
from space.scores import score_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"staged stage 1 (1 x 512)": 1, "evolution (8 x 512)": 8}


def children(space: WidthSpace, ordered, ratio: float, count: int, seed: int) -> list:
    incumbent = starts_for(SearchConfig(model="smollm2-135m", ratio=ratio), space, ordered,
                           score_spec("wanda-sp").standardized)[0]
    rng = np.random.default_rng(seed)
    switches = LevelSwitches(space, attention_prob=0.25, max_switches=6)
    return [switches.mutate(incumbent, rng, space.bounds.step * 4) for _ in range(count)]


def solve_flops(fitness: Fitness, subnet) -> int:
    """FLOPs of the solves this subnet still needs (layers not in the fitness's cache)."""
    dims, dense, total = subnet.dims, subnet.dims.dense_layer(), 0
    for index, widths in enumerate(subnet.layers):
        if widths != dense and fitness.cache.peek((index, widths)) is None:
            o = widths.kv_heads * widths.q_per_kv * dims.head_dim
            total += 2 * (o * o + widths.channels * widths.channels) * dims.hidden_size
    return total


def pass_flops(subnet, windows: int, seqlen: int, vocab: int) -> int:
    tokens = windows * seqlen
    return subnet.flops_per_token(seqlen) * tokens + 2 * subnet.dims.hidden_size * vocab * tokens


def measure(adapter, solvers, windows: torch.Tensor, pool: list, vocab: int) -> dict:
    """Per child: solve seconds and FLOPs, then its forward seconds whole and with kept states."""
    whole = Fitness(adapter, windows, solvers=solvers, prefix_bytes=0)
    reused = Fitness(adapter, windows, solvers=solvers, prefix_bytes=PREFIX_BYTES)
    rows = []
    for i, child in enumerate(pool):
        flops = solve_flops(whole, child)
        t0 = time.perf_counter()
        whole.overrides(child)  # fills the layer cache: the evaluations below only run passes
        solve = time.perf_counter() - t0
        reused.overrides(child)
        timed = {}
        for name, fitness in ((("whole", whole), ("reused", reused)) if i % 2 == 0
                              else (("reused", reused), ("whole", whole))):
            t0 = time.perf_counter()
            timed[name] = (fitness.evaluate(child).value, time.perf_counter() - t0)
        assert timed["whole"][0] == timed["reused"][0], "kept hidden states changed a value"
        rows.append({"solve_s": solve, "solve_flops": flops, "whole_s": timed["whole"][1],
                     "reused_s": timed["reused"][1],
                     "pass_flops": pass_flops(child, windows.shape[0], windows.shape[1], vocab)})
    skipped = reused.prefix.skipped / (reused.prefix.skipped + reused.prefix.run)
    return {**summarize(rows, skipped), "profile": profile_pass(whole, pool[0])}


def profile_pass(fitness: Fitness, child) -> dict[str, float]:
    """Shares of a whole pass's CPU time (torch.profiler, self time per op): matrix products,
    attention, everything else (norms, rotary embeddings, activations, casts: elementwise)."""
    from torch.profiler import ProfilerActivity, profile

    fitness.evaluate(child)  # solves cached, warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fitness.evaluate(child)
    groups = {"matmul": 0.0, "attention": 0.0, "elementwise and other": 0.0}
    for event in prof.key_averages():
        name = event.key
        group = ("matmul" if name in ("aten::mm", "aten::addmm", "aten::bmm") else
                 "attention" if "scaled_dot_product" in name else "elementwise and other")
        groups[group] += event.self_cpu_time_total
    total = sum(groups.values())
    return {k: v / total for k, v in groups.items()}


def summarize(rows: list[dict], skipped: float) -> dict:
    solve_s = sum(r["solve_s"] for r in rows)
    whole = statistics.median(r["whole_s"] for r in rows)
    reused = statistics.median(r["reused_s"] for r in rows)
    flops = statistics.median(r["pass_flops"] for r in rows)
    return {"children": len(rows), "solve_s_per_child": solve_s / len(rows),
            "solve_tflops": sum(r["solve_flops"] for r in rows) / max(solve_s, 1e-9) / 1e12,
            "pass_s_whole": whole, "pass_s_reused": reused, "pass_gflop": flops / 1e9,
            "tflops_whole": flops / whole / 1e12, "tflops_reused_equivalent": flops / reused / 1e12,
            "blocks_skipped": skipped,
            "candidate_s_whole": whole + solve_s / len(rows), "candidate_s_reused": reused + solve_s / len(rows),
            "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "auto"), default="bfloat16",
                        help="the candidates' scoring dtype (auto: the search's default on this machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    adapter, tokenizer, ordered, statistics = permuted_smollm2()
    solvers = output_solvers(adapter, statistics, precompute=torch.float32, prefix_only=PREFIX_ONLY)
    dtype = default_dtype("cpu") if args.dtype == "auto" else args.dtype
    adapter.model.to(getattr(torch, dtype))
    pool = children(WidthSpace(adapter.dims, preset="wide"), ordered, args.ratio, args.children, args.seed)
    peak = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    results = {}
    for name, count in SETTINGS.items():
        windows = CalibrationSpec("wikitext2", count, 512, 1, FITNESS_REGION).windows(tokenizer)
        results[name] = measure(adapter, solvers, windows, pool, adapter.config.vocab_size)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "rows"}), flush=True)
    peak_after = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32)}
    data = {"ratio": args.ratio, "dtype": dtype, "results": results, "peak_before": peak, "peak_after": peak_after,
            "seconds": round(time.time() - started, 1), "environment": environment(),
            "command": command_line(__file__, argv)}
    write_results(args.out, data, report)
    return 0


def report(data: dict) -> str:
    machine = data["environment"]["machine"]
    peak = {k: max(data["peak_before"][k], data["peak_after"][k]) for k in data["peak_before"]}
    dtype = data.get("dtype", "bfloat16")  # files written before --dtype scored in bfloat16
    pass_peak, short = (peak["bf16_tflops"], "bf16") if dtype == "bfloat16" else (peak["fp32_tflops"], "fp32")
    lines = [f"# Candidate throughput (SmolLM2-135M, one CPU worker, scoring in {dtype})", "", __doc__.split("\n\n")[1], "",
             __doc__.split("\n\n")[2], "",
             f"`{data['command']}` ({data['seconds']:.0f} s; {machine['cpu']}, {machine['threads']} threads). Matmul "
             f"peak in the same run (up to 2048², smaller where a matmul is slow; best of 2 s; before / after): bfloat16 "
             f"{data['peak_before']['bf16_tflops']:.3f} / {data['peak_after']['bf16_tflops']:.3f}, float32 "
             f"{data['peak_before']['fp32_tflops']:.3f} / {data['peak_after']['fp32_tflops']:.3f} TFLOP/s.", "",
             "| fitness windows | children | solves s / child (TFLOP/s, of fp32 peak) | pass GFLOP | whole pass s "
             f"(TFLOP/s, of {short} peak) | with kept states s (equivalent TFLOP/s) | blocks skipped | candidate s: "
             "whole → kept | speed-up | whole pass: matmul / attention / other |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        lines.append(
            f"| {name} | {r['children']} | {r['solve_s_per_child']:.3f} ({r['solve_tflops']:.3f}, "
            f"{r['solve_tflops'] / peak['fp32_tflops']:.0%}) | {r['pass_gflop']:.1f} | {r['pass_s_whole']:.3f} "
            f"({r['tflops_whole']:.3f}, {r['tflops_whole'] / pass_peak:.0%}) | {r['pass_s_reused']:.3f} "
            f"({r['tflops_reused_equivalent']:.3f}) | {r['blocks_skipped']:.0%} | {r['candidate_s_whole']:.3f} → "
            f"{r['candidate_s_reused']:.3f} | {r['candidate_s_whole'] / r['candidate_s_reused']:.2f}x | "
            + " / ".join(f"{share:.0%}" for share in r["profile"].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
