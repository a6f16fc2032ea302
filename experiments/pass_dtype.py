"""Whether the search's own calibration passes (``--pass-dtype``: the unit order's and the fitness
statistics') can run in bfloat16: a finished search's run folder, its statistics taken again with
the blocks in bfloat16, against its own float32 ones (the same windows, the same model).

Three measurements, each isolating one use of the passes:

1. the unit order (the config's ``importance``): time of both passes, and per layer the share of the
   winner's kept channels and heads that the bfloat16 order keeps too;
2. the fitness's least-squares statistics (dense, on the float32 order): time, and the fitness of
   ``--candidates`` of the study's trials under both (Spearman rank correlation, relative change),
   on the windows the staged search's last stage uses;
3. end to end: the winner's widths with the bfloat16 order's units, refitted and exported as the
   search's export was, measured like quality.md's cells (PTB validation decides; the test texts
   are reported beside the search's own export's).

    LLM_PRUNER_DATA=../shared/data python experiments/pass_dtype.py runs/quality/0.6/stats256-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec  # noqa: E402
from evaluators.environment import environment, matmul_tflops  # noqa: E402
from experiments.calibration_size import measure  # noqa: E402
from experiments.fitness_rank import spearman  # noqa: E402
from reform.local import output_solvers  # noqa: E402
from reform.spec import ReformSpec  # noqa: E402
from search.artifacts import trial_subnet_of  # noqa: E402
from search.cli.common import exit_status  # noqa: E402
from search.fitness import Fitness  # noqa: E402
from search.oneshot import reform_export  # noqa: E402
from search.prepare import PREFIX_ONLY, dense_scores  # noqa: E402
from search.rundir import load_run_config, load_run_study  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.errors import UserError  # noqa: E402
from space.export import read_subnet_record, write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.order import order_model  # noqa: E402
from space.subnet import Subnet  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HALF = torch.bfloat16


def shares(first: list[dict], second: list[dict], unit: str) -> list[float]:
    """Per layer, the share of ``first``'s kept ``unit`` that ``second`` keeps too (1 where none is kept)."""
    return [len(set(a[unit]) & set(b[unit])) / len(a[unit]) if a[unit] else 1.0 for a, b in zip(first, second)]


def orders(config) -> dict:
    """Both orders' scores (from the shared cache where computed before) and how long each took."""
    out = {}
    loaded = load_model(config.model, dtype=torch.float32)  # a score leaves the model as it found it
    calibration = config.order_calibration_spec()  # the order's own windows (order_nsamples)
    for name, pass_dtype in (("float32", None), ("bfloat16", HALF)):
        scored = dense_scores(loaded, [config.importance], calibration, ratio=config.ratio, pass_dtype=pass_dtype)
        out[name] = {"scores": scored.scores[config.importance], "seconds": round(scored.seconds, 1),
                     "reused": scored.reused}
    return out


def fitness_statistics(config, scores, subnets: list[Subnet]) -> dict:
    """The candidates' fitness under solvers from float32 and bfloat16 passes (the same order)."""
    loaded = load_model(config.model, dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    order_model(adapter, scores)
    windows = config.calibration_spec().windows(loaded.tokenizer)
    solvers, seconds = {}, {}
    for name, pass_dtype in (("float32", None), ("bfloat16", HALF)):
        started = time.time()
        solvers[name] = output_solvers(adapter, windows, damping=config.damping, precompute=torch.float32,
                                       prefix_only=PREFIX_ONLY, pass_dtype=pass_dtype)
        seconds[name] = round(time.time() - started, 1)
    adapter.model.to(getattr(torch, config.dtype))
    staged_windows = max(config.staged.windows) if config.staged is not None else 8
    fitness_windows = config.calibration_spec("fitness_windows").windows(loaded.tokenizer)[:staged_windows]
    values = {}
    for name in solvers:
        fitness = Fitness(adapter, fitness_windows, solvers=solvers[name], kind=config.fitness,
                          top_k=config.fitness_top_k)
        values[name] = [fitness.evaluate(s).value for s in subnets]
        del fitness
    change = [abs(b - a) / abs(a) for a, b in zip(values["float32"], values["bfloat16"])]
    return {"seconds": seconds, "windows": staged_windows, "values": values,
            "spearman": spearman(values["float32"], values["bfloat16"]),
            "max_relative_change": max(change), "mean_relative_change": sum(change) / len(change)}


def end_to_end(export: Path, config, scores, measured=measure) -> dict:
    """The winner's widths with the units of ``scores``' order, refitted as the search's export was, and
    ``measured`` (an export folder's perplexities)."""
    record = read_subnet_record(export)
    subnet = Subnet.from_dict(record["subnet"])
    loaded = load_model(config.model, dtype=torch.float32)
    layer_orders, _ = order_model(adapter_for(loaded.model), scores)
    record["kept"] = [order.kept(widths) for order, widths in zip(layer_orders, subnet.layers)]
    recipe = record["recipe"]
    reform = ReformSpec(**recipe["compensation"])
    calibration = CalibrationSpec.from_dict(recipe.get("export_calibration", recipe["calibration"]))
    loaded = load_model(config.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="pass_dtype_") as tmp:
        reform_export(loaded, record, reform=reform, calibration=calibration, out_dir=Path(tmp) / "export",
                      reformed_from=str(export))
        del loaded
        return {"kept": record["kept"], "ppl": measured(Path(tmp) / "export")}


def cell(run_dir: Path, candidates: int) -> dict:
    config = load_run_config(run_dir)
    if config.pass_dtype != "float32":
        raise UserError(f"{run_dir}: its statistics were taken in {config.pass_dtype}; give a float32 search")
    export = Path(json.loads((run_dir / "best.json").read_text())["export"])
    both = orders(config)
    study = load_run_study(run_dir)
    trials = [t for t in study.get_trials(deepcopy=False) if t.value is not None and "widths" in t.user_attrs]
    picked = trials[:: max(1, len(trials) // candidates)][:candidates]
    dims = Subnet.from_dict(read_subnet_record(export)["subnet"]).dims
    statistics = fitness_statistics(config, both["float32"]["scores"], [trial_subnet_of(t, dims) for t in picked])
    rebuilt = end_to_end(export, config, both["bfloat16"]["scores"])
    own = read_subnet_record(export)["kept"]
    return {
        "run_dir": str(run_dir), "ratio": config.ratio, "importance": config.importance,
        "windows": config.calibration_spec().to_dict(), "order_windows": config.order_calibration_spec().to_dict(),
        "order": {"seconds": {k: v["seconds"] for k, v in both.items()},
                  "reused": {k: v["reused"] for k, v in both.items()},
                  "channels_kept_share": shares(own, rebuilt["kept"], "channels"),
                  "heads_kept_share": shares(own, rebuilt["kept"], "heads")},
        "fitness_statistics": {**statistics, "trials": [t.number for t in picked]},
        "search": search_ppl(export),
        "bfloat16_order": rebuilt["ppl"],
    }


def search_ppl(export: Path) -> dict:
    """The search's own export as quality.json measured it (the same windows as :func:`measure`)."""
    cells = json.loads((RESULTS / "quality.json").read_text())["cells"].values()
    own = next((c for c in cells if Path(c["export"]).resolve() == export.resolve()), None)
    if own is None:
        raise UserError(f"{export} is not a cell of experiments/results/quality.json")
    return {"validation": own["ppl"]["ptb:validation"], **own["ppl"]}


def report(data: dict) -> str:
    lines = ["# The search's own calibration passes in bfloat16", "",
             "Generated by `experiments/pass_dtype.py` (command below); the run folder's float32 statistics against",
             "the same windows' statistics with the blocks in bfloat16. Decisions read PTB validation.", "",
             f"Machine: {data['environment']['machine']['cpu']}; bf16 matmul peak {data['bf16_tflops']:.2f} TFLOP/s.", "",
             "| run | order s (f32 / bf16) | kept channels shared (mean / min) | heads shared (min) | "
             "fitness stats s (f32 / bf16) | fitness Spearman (n) | max rel. change | "
             "PTB valid (search / bf16 order) | WT2 / PTB / C4 (search / bf16 order) |", "|" + "---|" * 9]
    for c in data["cells"].values():
        o, f, s, b = c["order"], c["fitness_statistics"], c["search"], c["bfloat16_order"]
        channels = o["channels_kept_share"]
        lines.append(
            f"| {c['run_dir']} | {o['seconds']['float32']:.0f} / {o['seconds']['bfloat16']:.0f} | "
            f"{sum(channels) / len(channels):.4f} / {min(channels):.4f} | {min(o['heads_kept_share']):.3f} | "
            f"{f['seconds']['float32']:.0f} / {f['seconds']['bfloat16']:.0f} | {f['spearman']:.4f} "
            f"({len(f['trials'])}) | {f['max_relative_change']:.2e} | {s['validation']:.2f} / {b['validation']:.2f} | "
            f"{s['wikitext2']:.2f} / {s['ptb']:.2f} / {s['c4:heldout']:.2f} vs "
            f"{b['wikitext2']:.2f} / {b['ptb']:.2f} / {b['c4:heldout']:.2f} |")
    lines += ["", "The float32 order's time is the one its search recorded when it comes from the shared cache; "
              "the bfloat16 order's and both fitness statistics' are measured here, beside whatever else the "
              "machine ran (pass_dtype.notes.md says what).", "",
              "```", data["command"], "```", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS / "pass_dtype.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return exit_status(lambda: run(parse_args(argv)))


def run(args) -> int:
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"cells": {}}
    data["bf16_tflops"] = matmul_tflops(torch.bfloat16)
    data["environment"] = environment()
    data["command"] = "LLM_PRUNER_DATA=../shared/data python experiments/pass_dtype.py " + " ".join(
        str(d) for d in args.run_dirs)
    for run_dir in args.run_dirs:
        data["cells"][str(run_dir)] = cell(run_dir, args.candidates)
        write_json(args.out, data)  # each run folder's cell kept as soon as measured
    text = report(data)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
