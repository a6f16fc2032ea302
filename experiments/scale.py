"""Scale (issue 15, measure a and b): the memory plan of a 7B-70B search per worker, and a simulation of
Llama-3.1-8B's layers on this CPU against it, extrapolated to 32 layers and to an H100.

(a) ``llm-pruner search --model CONFIG --ratio 0.5 --dry-run --device cuda --gpu-memory 80`` on the
published configs (``$LLM_PRUNER_DATA/../configs``: Llama-2-7B, Llama-3.1-8B, Qwen2.5-7B,
Llama-3.1-70B), with today's defaults (solver state in the scoring dtype on a GPU) and with
``--solver-dtype float32`` / ``--solver-device cpu`` / two GPUs per worker.

(b) ``--layers`` layers of ``--model``'s shapes (Llama-3.1-8B), random bfloat16 weights, random
calibration tokens, run as a worker runs them: the model upcast to float32 for the preparation
(the dense calibration pass collecting each layer's o_proj/down_proj statistics, then the float64
factoring of its least-squares solvers, ``reform.local.output_solvers`` as the search builds them),
then cast to bfloat16 for the search, where ``--candidates`` subnets (every layer at the same widths,
each new, so each layer is solved, not taken from the cache) are scored by the perplexity fitness.
Per layer: the time of the calibration pass and of the factoring, the process's peak resident
memory (RSS sampled every 10 ms by a thread: everything the process holds, the model included), the
solver state, and per candidate the seconds of the rectifying solves, of each layer's forward (hooks
on the decoder layers) and of the rest (embedding, LM head, loss). The plan of the same model and
windows is computed beside it. The extrapolation to 32 layers multiplies the per-layer figures;
the one to an H100 divides each phase's FLOPs (counted from the shapes) by the H100's peak for
the phase's dtype, at 100 % of peak (a lower bound) and at the fraction of peak this CPU reached
(the CPU's peak measured in the same run with plain matmuls), with the HBM bandwidth as a floor.

Defaults: 2 layers, statistics 8 x 512 tokens (the factoring, minutes per layer here, does not depend
on them), fitness 4 x 512 tokens, 3 candidates: about 9 minutes on the project's loaded 2-core CPU and
17 GB of memory (refused when the plan does not fit the memory available).

    LLM_PRUNER_DATA=../shared/data nice -n 19 python experiments/scale.py
    python experiments/scale.py --render      # the .md again from the JSON
    LLM_PRUNER_DATA=../shared/data python experiments/scale.py --layers 1 --nsamples 2 --fitness-nsamples 1 \\
        --candidates 1 --out /tmp/scale.json     # a quick try (the factoring alone is minutes per layer)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from evaluators.environment import environment, matmul_tflops
from reform.local import output_solvers
from search.cli import main as cli
from search.cli.common import parse_args_with_config
from search.config import SearchConfig
from search.fitness import Fitness
from search.plan import config_dims, describe, factoring_bytes, layer_solver_bytes, memory_plan
from search.prepare import PREFIX_ONLY
from space.adapters import adapter_for
from space.export import write_json
from space.subnet import LayerWidths, ModelDims, Subnet

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(os.environ.get("LLM_PRUNER_DATA", "../shared/data")).resolve().parent / "configs"
MODELS = ("llama-2-7b", "llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b")
VARIANTS = {"default (solver state bfloat16 on the GPU)": [], "solver-dtype float32": ["--solver-dtype", "float32"],
            "solver-device cpu": ["--solver-device", "cpu"],
            "solver-device cpu, 3 GPUs per worker": ["--solver-device", "cpu", "--gpus-per-worker", "3"]}
# H100 SXM5 datasheet: dense bfloat16 tensor cores, FP32 (no TF32: torch's default for float32
# matmuls), FP64 tensor cores; HBM3 bandwidth
H100 = {"bfloat16": 989e12, "float32": 67e12, "float64": 67e12, "bandwidth": 3.35e12}
# every layer of a candidate at these (KV heads, query heads per KV head, MLP channels) fractions
CANDIDATES = ((1.0, 1.0, 0.5), (0.75, 1.0, 0.5), (1.0, 0.5, 0.625), (0.5, 1.0, 0.375))


def plan_rows(ratio: float) -> list[dict]:
    """(a): the dry-run plan of every published config and variant, through the command line."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            for variant, flags in VARIANTS.items():
                args = ["search", "--model", str(CONFIGS / name), "--ratio", str(ratio), "--dry-run", "--device",
                        "cuda", "--gpu-memory", "80", *flags]
                cli(["-q", *args, "--run-dir", f"{tmp}/run", "--json", f"{tmp}/plan.json"])
                plan = json.loads(Path(tmp, "plan.json").read_text())
                rows.append({"model": name, "variant": variant, "plan": plan, "text": describe(plan),
                             "command": "llm-pruner " + " ".join(args).replace(str(CONFIGS), "../shared/configs")})
    return rows


class RssSampler(threading.Thread):
    """The process's resident bytes every ``interval`` seconds, in the background."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.samples, self.running = interval, [], True
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self.page

    def run(self) -> None:
        while self.running:
            self.samples.append((time.perf_counter(), self.rss()))
            time.sleep(self.interval)

    def peak(self, start: float, end: float) -> int:
        return max([r for t, r in self.samples if start <= t <= end] + [self.rss() if end >= time.perf_counter() else 0])


class LayerClock:
    """Per decoder layer, the time of its last forward's end and the seconds its forwards took."""

    def __init__(self, blocks):
        self.last_end = [0.0] * len(blocks)
        self.seconds = [0.0] * len(blocks)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda *_, i=i: self.start(i)))
            self.handles.append(block.register_forward_hook(lambda *_, i=i: self.end(i)))

    def start(self, i: int) -> None:
        self.started = time.perf_counter()

    def end(self, i: int) -> None:
        self.last_end[i] = time.perf_counter()
        self.seconds[i] += self.last_end[i] - self.started

    def reset(self) -> None:
        self.seconds = [0.0] * len(self.seconds)


def build(hf_config):
    """The model of ``hf_config`` with random bfloat16 weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()


def prepare(adapter, windows: torch.Tensor, dtype: torch.dtype, sampler: RssSampler) -> tuple[list, list[dict]]:
    """The worker's preparation, timed and measured per layer: the calibration pass of a layer ends
    at its block's last forward, its factoring when the pass moves on to the next layer."""
    clock, starts = LayerClock(list(adapter.decoder_layers())), []

    def progress(layers):
        for layer in layers:
            starts.append((time.perf_counter(), sampler.rss()))
            yield layer

    began = time.perf_counter()
    solvers = output_solvers(adapter, windows, precompute=dtype, prefix_only=PREFIX_ONLY, progress=progress)
    ended = time.perf_counter()
    rows = []
    for i, ((start, rss), layer) in enumerate(zip(starts, solvers)):
        end = starts[i + 1][0] if i + 1 < len(starts) else ended
        rows.append({"layer": i, "calibration_seconds": clock.last_end[i] - start,
                     "factoring_seconds": end - clock.last_end[i], "rss_before": rss,
                     "calibration_peak_rss": sampler.peak(start, clock.last_end[i]),
                     "factoring_peak_rss": sampler.peak(clock.last_end[i], end),
                     "state_bytes": {name: s.state_bytes() for name, s in layer.items()}})
    rows[0]["capture_seconds"] = starts[0][0] - began  # the embeddings' pass before the first layer
    for handle in clock.handles:
        handle.remove()
    return solvers, rows


def candidate_widths(dims, fractions) -> LayerWidths:
    kv, q, channels = fractions
    return LayerWidths(max(1, round(kv * dims.num_kv_heads)), max(1, round(q * dims.group_size)),
                       round(channels * dims.intermediate_size))


def score(adapter, solvers, windows: torch.Tensor, count: int, sampler: RssSampler) -> list[dict]:
    """The search's perplexity fitness on ``count`` new candidates: the solves of their rectified
    layers, then each layer's forward and the rest of the scoring (the cache holds the solves then)."""
    dims = adapter.dims
    fitness = Fitness(adapter, windows, solvers=solvers)
    clock, rows = LayerClock(list(adapter.decoder_layers())), []
    for fractions in CANDIDATES[:count]:
        widths = candidate_widths(dims, fractions)
        subnet = Subnet(dims, [widths] * dims.num_layers)
        started = time.perf_counter()
        fitness.overrides(subnet)
        solved = time.perf_counter()
        clock.reset()
        value = fitness.evaluate(subnet).value
        ended = time.perf_counter()
        rows.append({"widths": [widths.kv_heads, widths.q_per_kv, widths.channels], "block_ratio": subnet.ratio(),
                     "value": value, "solve_seconds_per_layer": (solved - started) / dims.num_layers,
                     "forward_seconds_per_layer": sum(clock.seconds) / dims.num_layers,
                     "rest_seconds": ended - solved - sum(clock.seconds), "seconds": ended - started,
                     "peak_rss": sampler.peak(started, ended), "cache_bytes": fitness.cache.bytes,
                     "cache_entries": len(fitness.cache.entries)})
        print(json.dumps(rows[-1]), flush=True)
    for handle in clock.handles:
        handle.remove()
    return rows


def phase_costs(dims, vocab: int, statistics, fitness, widths: LayerWidths) -> dict[str, dict]:
    """FLOPs (2 per multiply-add) and bytes (each tensor read or written once) of each phase, per
    layer (``head``: per candidate), and the dtype it computes in."""
    h, n_o, n_d, layer = dims.hidden_size, dims.num_heads * dims.head_dim, dims.intermediate_size, Subnet.dense(dims)
    tokens, batches = statistics.nsamples * statistics.seqlen, -(-statistics.nsamples // 8)
    dense_params = dims.layer_params(dims.dense_layer())
    k_o, k_d = widths.heads * dims.head_dim, widths.channels
    o_prefix = widths.q_per_kv == dims.group_size
    fit_tokens = fitness.nsamples * fitness.seqlen
    return {
        # the float32 forward of the dense layer, and the float32 products of its o/down grams (float64 sums)
        "calibration": {"dtype": "float32", "flops": tokens * layer.flops_per_token(statistics.seqlen) / dims.num_layers
                        + 2 * tokens * (n_o**2 + n_d**2),
                        "bytes": batches * (4 * dense_params + 36 * (n_o**2 + n_d**2))},
        # per projection: B = C Wᵀ, Cholesky, L⁻¹ (a triangular solve against the identity), P = L⁻¹ B
        "factoring": {"dtype": "float64", "flops": sum(4 / 3 * n**3 + 4 * n * n * h for n in (n_o, n_d)),
                      "bytes": sum(8 * (6 * n * n + 4 * n * h) for n in (n_o, n_d))},
        # down: (L⁻¹[:k,:k])ᵀ P[:k]; o: the same, or (kept heads not a prefix) its block rebuilt and solved
        "solve": {"dtype": "float32", "flops": 2 * k_d**2 * h + (2 * k_o**2 * h if o_prefix else
                                                                   2 * k_o**2 * n_o + k_o**3 / 3 + 2 * k_o**2 * h),
                  "bytes": 4 * (k_d**2 + k_d * h) + (4 if o_prefix else 8) * (k_o**2 + k_o * max(h, n_o))},
        "forward": {"dtype": "bfloat16", "flops": fit_tokens * Subnet(dims, [widths] * dims.num_layers)
                    .flops_per_token(fitness.seqlen) / dims.num_layers,
                    "bytes": 2 * dims.layer_params(widths) + 2 * fit_tokens * (4 * h + 3 * k_d + 2 * k_o)},
        "head": {"dtype": "bfloat16", "flops": 2 * fit_tokens * h * vocab,
                 "bytes": 2 * h * vocab + fit_tokens * vocab * 10},
    }


def extrapolate(seconds: dict[str, float], costs: dict[str, dict], cpu_peak: dict[str, float]) -> dict[str, dict]:
    """Per phase: this CPU's achieved rate and fraction of its measured matmul peak, and the H100's
    seconds at 100 % of its peak (a lower bound) and at the CPU's fraction, HBM bandwidth a floor."""
    out = {}
    for phase, cost in costs.items():
        rate = cost["flops"] / seconds[phase]
        fraction = min(1.0, rate / cpu_peak[cost["dtype"]])
        floor = cost["bytes"] / H100["bandwidth"]
        out[phase] = {**cost, "cpu_seconds": seconds[phase], "cpu_tflops": rate / 1e12, "cpu_fraction": fraction,
                      "h100_seconds_roofline": max(cost["flops"] / H100[cost["dtype"]], floor),
                      "h100_seconds_at_cpu_fraction": max(cost["flops"] / (fraction * H100[cost["dtype"]]), floor)}
    return out


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def search_bytes(plan: dict, cache_bytes: int | None = None) -> int:
    """The search phase's planned bytes (the plan's peak is the larger of it and the preparation)."""
    cache = plan["cache_bytes"] if cache_bytes is None else cache_bytes
    return (plan["weights_bytes"] + plan["fitness_device_bytes"] + cache + plan.get("prefix_bytes", 0)
            + plan["activation_bytes"] + plan["logits_bytes"])


def simulate(args, sampler: RssSampler) -> dict:
    """(b): ``args.layers`` layers of ``args.model``'s shapes through a worker's preparation and scoring."""
    from transformers import AutoConfig

    config = SearchConfig.create(str(args.model), 0.5, nsamples=args.nsamples, calib_seqlen=args.seqlen,
                                 fitness_nsamples=args.fitness_nsamples, fitness_seqlen=args.seqlen,
                                 dtype="bfloat16")  # a GPU worker's scoring dtype, simulated on any CPU
    hf_config = AutoConfig.from_pretrained(args.model)
    full_dims, vocab = config_dims(hf_config), hf_config.vocab_size
    hf_config.num_hidden_layers = args.layers
    plan = memory_plan(config, config_dims(hf_config), vocab, memory=None)
    if plan["peak_bytes"] > available_bytes():  # the plan is an upper bound: refuse what would not fit
        raise SystemExit(f"the plan needs {plan['peak_bytes'] / 1e9:.1f} GB; {available_bytes() / 1e9:.1f} GB available")
    baseline, started = sampler.rss(), time.perf_counter()
    model = build(hf_config)
    built = time.perf_counter()
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(0)
    statistics = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=generator)
    windows = torch.randint(0, vocab, (args.fitness_nsamples, args.seqlen), generator=generator)
    model.to(torch.float32)  # the engine prepares in float32
    solvers, layers = prepare(adapter, statistics, getattr(torch, config.state_dtype), sampler)
    prepared = time.perf_counter()
    model.to(getattr(torch, config.dtype))  # (its transient, both copies of one tensor, is the preparation's)
    converted = time.perf_counter()
    candidates = score(adapter, solvers, windows, args.candidates, sampler)
    return {"config": config.to_dict(), "layers": args.layers, "baseline_rss": baseline,
            "build_seconds": built - started, "prepare_seconds": prepared - built,
            "prepare_peak_rss": sampler.peak(built, converted),
            "search_peak_rss": sampler.peak(converted, time.perf_counter()),
            "per_layer": layers, "candidates": candidates, "plan": plan,
            "plan_32": memory_plan(config, full_dims, vocab, memory=None),
            "layer_solver_bytes": layer_solver_bytes(adapter.dims, getattr(torch, config.state_dtype).itemsize),
            "factoring_bytes": factoring_bytes(adapter.dims), "dims": adapter.dims.to_dict(), "vocab": vocab,
            "layer_params": adapter.dims.layer_params(adapter.dims.dense_layer())}


def summarize(sim: dict, cpu_peak: dict[str, float]) -> dict:
    """Per-layer means, the phases extrapolated to an H100, and everything to 32 layers."""
    dims = ModelDims(**sim["dims"])
    config = SearchConfig(**sim["config"])
    statistics, fitness = config.calibration_spec(), config.calibration_spec("fitness_windows")
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    prep = {"calibration": mean(sim["per_layer"], "calibration_seconds"),
            "factoring": mean(sim["per_layer"], "factoring_seconds")}
    out = {"prepare": None, "candidates": [], "layers": 32}
    for row in sim["candidates"]:
        costs = phase_costs(dims, sim["vocab"], statistics, fitness, LayerWidths(*row["widths"]))
        if out["prepare"] is None:
            out["prepare"] = extrapolate(prep, {k: costs[k] for k in prep}, cpu_peak)
        phases = extrapolate({"solve": row["solve_seconds_per_layer"], "forward": row["forward_seconds_per_layer"],
                              "head": row["rest_seconds"]}, {k: costs[k] for k in ("solve", "forward", "head")},
                             cpu_peak)
        totals = {}
        for name, key in (("cpu", "cpu_seconds"), ("h100_roofline", "h100_seconds_roofline"),
                          ("h100_at_cpu_fraction", "h100_seconds_at_cpu_fraction")):
            per_layer = phases["solve"][key] + phases["forward"][key]
            totals[name] = {"new_layers": 32 * per_layer + phases["head"][key],
                            "cached_layers": 32 * phases["forward"][key] + phases["head"][key]}
        out["candidates"].append({"widths": row["widths"], "phases": phases, "seconds_32_layers": totals})
    out["prepare_seconds_32_layers"] = {
        name: 32 * sum(p[key] for p in out["prepare"].values())
        for name, key in (("cpu", "cpu_seconds"), ("h100_roofline", "h100_seconds_roofline"),
                          ("h100_at_cpu_fraction", "h100_seconds_at_cpu_fraction"))}
    state = sum(sim["per_layer"][0]["state_bytes"].values())
    more = 32 - sim["layers"]
    out["memory_32_layers"] = {  # measured peaks over the baseline, plus the missing layers' weights and state
        "prepare_measured": sim["prepare_peak_rss"] - sim["baseline_rss"] + more * (4 * sim["layer_params"] + state),
        "prepare_planned": sim["plan_32"]["prepare_bytes"],
        "search_measured": sim["search_peak_rss"] - sim["baseline_rss"] + more * (2 * sim["layer_params"] + state),
        "search_planned": search_bytes(sim["plan_32"]),
        "cache_bytes_per_layer": sim["candidates"][0]["cache_bytes"] / max(1, sim["candidates"][0]["cache_entries"])}
    return out


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def plan_table(rows: list[dict]) -> list[str]:
    lines = ["| model | variant | parameters (B) | weights | solvers on the GPU | solvers in host memory | caches (layers, hidden states) | "
             "activations | preparation | peak | fits 80 GB | GPUs of 80 GB per worker |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        p = row["plan"]
        lines.append(f"| {row['model']} | {row['variant']} | {p['params'] / 1e9:.2f} | {gb(p['weights_bytes'])} | "
                     f"{gb(p['fitness_device_bytes'])} | {gb(p['host_fitness_bytes'])} | {gb(p['cache_bytes'] + p.get('prefix_bytes', 0))} | "
                     f"{gb(p['activation_bytes'])} | {gb(p['prepare_bytes'])} | **{gb(p['peak_bytes'])}** | "
                     f"{'yes' if p['fits'] else 'no'} | {-(-p['peak_bytes'] // int(80e9))} |")
    return lines


def simulation_tables(sim: dict, summary: dict) -> list[str]:
    plan, layer_plan = sim["plan"], sum(sim["layer_solver_bytes"].values())
    lines = ["| layer | calibration pass (s) | factoring (s) | RSS at its start (GB) | peak RSS, calibration (GB) | "
             "peak RSS, factoring (GB) | solver state, GB (planned) |", "|---|---|---|---|---|---|---|"]
    for row in sim["per_layer"]:
        lines.append(f"| {row['layer']} | {row['calibration_seconds']:.1f} | {row['factoring_seconds']:.1f} | "
                     f"{gb(row['rss_before'] - sim['baseline_rss'])} | "
                     f"{gb(row['calibration_peak_rss'] - sim['baseline_rss'])} | "
                     f"{gb(row['factoring_peak_rss'] - sim['baseline_rss'])} | "
                     f"{gb(sum(row['state_bytes'].values()))} ({gb(layer_plan)}) |")
    lines += ["", f"Whole simulation, RSS over the process's before the model was built ({gb(sim['baseline_rss'])} GB), "
              f"against the plan of the same {sim['layers']}-layer model and windows:", "",
              "| phase | measured peak (GB) | planned (GB) |", "|---|---|---|",
              f"| preparation | {gb(sim['prepare_peak_rss'] - sim['baseline_rss'])} | {gb(plan['prepare_bytes'])} |",
              f"| search | {gb(sim['search_peak_rss'] - sim['baseline_rss'])} | {gb(search_bytes(plan))} (layer cache "
              "at its "
              f"bound); {gb(search_bytes(plan, sim['candidates'][-1]['cache_bytes']))} (at the measured "
              f"{gb(sim['candidates'][-1]['cache_bytes'])}) |",
              "| a layer's factoring, over the RSS at its start | " + " / ".join(
                  gb(r["factoring_peak_rss"] - r["rss_before"]) for r in sim["per_layer"]) +
              f" | {gb(sim['factoring_bytes'] + layer_plan)} (the float64 factoring and the layer's state) |", "",
              "| candidate (KV heads, q per KV, channels per layer) | block ratio | solves (s per layer) | "
              "forward (s per layer) | embedding, head, loss (s) | total (s) |", "|---|---|---|---|---|---|"]
    for row in sim["candidates"]:
        lines.append(f"| {tuple(row['widths'])} | {row['block_ratio']:.3f} | {row['solve_seconds_per_layer']:.2f} | "
                     f"{row['forward_seconds_per_layer']:.2f} | {row['rest_seconds']:.2f} | {row['seconds']:.2f} |")
    return lines


def extrapolation_tables(summary: dict) -> list[str]:
    lines = ["| phase | dtype | GFLOP | GB moved | CPU (s) | CPU TFLOP/s (of its peak) | H100 (s), roofline | "
             "H100 (s), at the CPU's fraction |", "|---|---|---|---|---|---|---|---|"]
    first = summary["candidates"][0]
    for name, phase in [*summary["prepare"].items(), *first["phases"].items()]:
        lines.append(f"| {name} | {phase['dtype']} | {phase['flops'] / 1e9:.0f} | {phase['bytes'] / 1e9:.2f} | "
                     f"{phase['cpu_seconds']:.2f} | {phase['cpu_tflops']:.3f} ({100 * phase['cpu_fraction']:.0f} %) | "
                     f"{phase['h100_seconds_roofline'] * 1e3:.2f} ms | "
                     f"{phase['h100_seconds_at_cpu_fraction'] * 1e3:.1f} ms |")
    prep = summary["prepare_seconds_32_layers"]
    lines += ["", "| 32 layers | this CPU | H100, roofline | H100, at the CPU's fraction |", "|---|---|---|---|",
              f"| preparation (calibration + factoring) | {prep['cpu'] / 60:.1f} min | {prep['h100_roofline']:.2f} s | "
              f"{prep['h100_at_cpu_fraction']:.1f} s |"]
    for row in summary["candidates"]:
        t = row["seconds_32_layers"]
        for kind, label in (("new_layers", "every layer solved"), ("cached_layers", "every layer cached")):
            lines.append(f"| candidate {tuple(row['widths'])}, {label} | {t['cpu'][kind]:.0f} s | "
                         f"{t['h100_roofline'][kind] * 1e3:.1f} ms | {t['h100_at_cpu_fraction'][kind] * 1e3:.1f} ms |")
    memory = summary["memory_32_layers"]
    lines += ["", "| 32 layers, memory (on this CPU: the whole float32 model in the preparation) | measured here, "
              "extended by the missing layers' weights and solver state (GB) | planned (GB) |",
              "|---|---|---|", f"| preparation | {gb(memory['prepare_measured'])} | {gb(memory['prepare_planned'])} |",
              f"| search | {gb(memory['search_measured'])} | {gb(memory['search_planned'])} (layer cache at its bound) |"]
    return lines


def markdown(data: dict) -> str:
    env, peak, sim = data["environment"], data["cpu_matmul_tflops"], data.get("simulation")
    lines = ["# Scale: the memory plan of a 7B-70B search, and Llama-3.1-8B's layers simulated on a CPU", "",
             f"`LLM_PRUNER_DATA=../shared/data nice -n 19 {data['command'].strip()}` (issue 15, measures a and b; "
             f"{data['seconds'] / 60:.1f} min). Machine: "
             f"{env['machine']['cpu']}, {env['machine']['threads']} threads, no GPU; torch "
             f"{env['versions'].get('torch')}, transformers {env['versions'].get('transformers')}. Matmul peak of this "
             "CPU in the same run (`evaluators.environment.matmul_tflops`, up to 2048², smaller where a matmul is "
             f"slow; best of 2 s): bfloat16 "
             f"{peak['bfloat16']:.3f}, float32 {peak['float32']:.3f}, float64 {peak['float64']:.3f} TFLOP/s. Other "
             "jobs shared the two cores throughout (this one ran under `nice -n 19`): every time here is an upper "
             "bound, and the achieved fractions of peak are rough.", "",
             "## (a) The plan per worker, GB (`--dry-run`, device cuda, `--gpu-memory 80`, today's defaults)", "",
             *([f"(a) was computed again by `{data['plans_command']}`.", ""] if "plans_command" in data else []),
             *plan_table(data["plans"]), "",
             "The ratio enters the plan through the layer cache's bound (two candidates' rectified layers at that "
             "ratio). A worker over several GPUs must keep the least-squares state in host memory (`--solver-device "
             "cpu`; the search refuses otherwise), so the default rows of Llama-3.1-70B, which no single 80 GB GPU "
             "holds, are not a configuration the search accepts: its plan is the `--solver-device cpu, 3 GPUs per "
             "worker` row. On a GPU the preparation streams the float32 model one block at a "
             "time (`prepare_streamed`); the last column is the `--gpus-per-worker` the peak asks for. Commands:", "",
             "```bash",
             *[row["command"] for row in data["plans"]], "```"]
    if sim is None:
        return "\n".join(lines) + "\n"
    config = SearchConfig(**sim["config"])
    statistics, fitness = config.calibration_spec(), config.calibration_spec("fitness_windows")
    summary = data["summary"]
    lines += ["", f"## (b) {sim['layers']} layers of {Path(config.model).name}'s shapes on this CPU", "",
              f"Random bfloat16 weights (upcast to float32 for the preparation, as the engine loads it), random "
              f"tokens. Statistics: {statistics.nsamples} x {statistics.seqlen} = {statistics.nsamples * statistics.seqlen} "
              f"tokens, float32 model, solver state {config.state_dtype}. Fitness: {fitness.nsamples} x {fitness.seqlen} = "
              f"{fitness.nsamples * fitness.seqlen} tokens per candidate, bfloat16 model, perplexity after least "
              "squares. Memory: the process's resident set (RSS), sampled every 10 ms by a thread, over what it "
              "held before the model was built (RSS also keeps heap the allocator freed but did not return, so it bounds "
              "the live tensors from above; the preparation's window includes the cast to bfloat16). Building the "
              "model took "
              f"{sim['build_seconds']:.0f} s (not a worker's cost: it loads weights).", "",
              *simulation_tables(sim, summary), "",
              "### Extrapolated to 32 layers and to an H100", "",
              "Each phase's FLOPs are counted from the shapes (2 per multiply-add): the calibration pass is the "
              "dense layer's float32 forward (`Subnet.flops_per_token`) plus the o_proj/down_proj gram products "
              "2·T·d_in²; the factoring of a projection (d_in = n, d_out = h) is B = C Wᵀ (2n²h), Cholesky "
              "(n³/3), L⁻¹ by a triangular solve against the identity (n³) and P = L⁻¹B (2n²h), in float64; a "
              "candidate's solve of a layer is (L⁻¹[:k,:k])ᵀ P[:k] (2k²h) per projection; its forward the kept "
              "layer's bfloat16 forward; the head 2·T·h·vocab. Bytes count each tensor read or written once. The "
              "H100 (SXM) figures: bfloat16 989, float32 67 (no TF32, torch's default), float64 67 TFLOP/s, HBM3 "
              "3.35 TB/s. *Roofline* = max(FLOPs / peak, bytes / bandwidth), a lower bound; *at the CPU's fraction* "
              "divides by the fraction of its own measured peak this CPU reached in the phase instead (the same "
              "efficiency on both machines). Phases of the first candidate; 32 layers = 32 x the per-layer "
              "figures (+ the head once per candidate).", "",
              *extrapolation_tables(summary), "", *reading(sim, summary)]
    return "\n".join(lines) + "\n"


def reading(sim: dict, summary: dict) -> list[str]:
    """What the numbers say, from the numbers."""
    first, prep = summary["candidates"][0], summary["prepare"]
    phases, totals = first["phases"], first["seconds_32_layers"]["h100_roofline"]
    entry = summary["memory_32_layers"]["cache_bytes_per_layer"]
    bound = sim["plan_32"]["cache_bytes"]
    return [
        "Reading:", "",
        f"- On this CPU the preparation is the factoring's: {prep['factoring']['cpu_seconds']:.0f} s of float64 per "
        f"layer ({prep['factoring']['flops'] / 1e12:.1f} TFLOP, of which the triangular inverse against the identity "
        "is n³; an inverse that used the triangle would be n³/3) against "
        f"{prep['calibration']['cpu_seconds']:.0f} s for the calibration pass of "
        f"{sim['config']['calibration']['nsamples'] * sim['config']['calibration']['seqlen']} tokens.",
        f"- On an H100 a candidate is its solves: {phases['solve']['h100_seconds_roofline'] * 1e3:.1f} ms per layer in "
        f"float32 (simulated with the CPU's default; on a GPU the default keeps L⁻¹ and P in bfloat16, at the "
        f"tensor cores' rate) ({phases['solve']['flops'] / 1e9:.0f} GFLOP, as much as the layer's forward on "
        f"{sim['config']['fitness_windows']['nsamples'] * sim['config']['fitness_windows']['seqlen']} tokens, at 1/15 "
        f"of the bfloat16 rate), {totals['new_layers'] * 1e3:.0f} ms for 32 new layers against "
        f"{totals['cached_layers'] * 1e3:.0f} ms with every layer cached: the layer cache decides the throughput.",
        f"- A cached layer of candidate {tuple(first['widths'])} is {entry / 1e6:.0f} MB (bfloat16), so the "
        f"{bound / 2**30:.0f} GiB cache holds {bound // max(1, entry):.0f} of its 32 layers: scoring a child layer by "
        "layer after its parent evicts, least recently used first, the parent's layers the child needs next, and "
        "every layer is solved again. The candidate's own rectified layers "
        f"({32 * entry / 1e9:.1f} GB) are then live beside the cache: more than the plan's cache term. (Found "
        "here; since then the bound is two candidates' layers at the search's ratio, at least 1 GiB: "
        "`search.fitness.cache_bound`, 4.8 GB for Llama-3.1-8B at 0.5, in (a).)",
        ""]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CONFIGS / "llama-3.1-8b", help="a config folder to simulate")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=8, help="statistics windows")
    parser.add_argument("--fitness-nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (statistics and fitness)")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--plans-only", action="store_true",
                        help="only (a): into --out's JSON where it exists, its simulation (b) kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON of --out")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.read_text())))
        return 0
    started = time.time()
    command = "python experiments/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plans = plan_rows(0.5)
    print("\n\n".join(row["text"] for row in plans), flush=True)
    if args.plans_only and args.out.is_file():  # (a) again (the plan changed), the simulation of (b) kept
        data = {**json.loads(args.out.read_text()), "plans": plans, "plans_command": command}
        write_json(args.out, data)
        args.out.with_suffix(".md").write_text(markdown(data))
        return 0
    cpu_peak = {name: matmul_tflops(getattr(torch, name)) * 1e12 for name in ("bfloat16", "float32", "float64")}
    data = {"command": command, "environment": environment(),
            "cpu_matmul_tflops": {k: v / 1e12 for k, v in cpu_peak.items()}, "h100": H100, "plans": plans}
    if not args.plans_only:
        sampler = RssSampler()
        sampler.start()
        data["simulation"] = simulate(args, sampler)
        sampler.running = False
        data["summary"] = summarize(data["simulation"], cpu_peak)
    data["seconds"] = round(time.time() - started, 1)
    write_json(args.out, data)
    args.out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
