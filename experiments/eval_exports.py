"""Evaluate a dense model and its exported subnets side by side; write one table.

The first model is the reference (the dense one); the others are usually exported pruned
folders (``space.export``), which load with ``trust_remote_code``. For each model: WikiText-2
test perplexity (PROTOCOL.md: 2048-token windows, float32 by default), the zero-shot tasks
(``evaluators.harness``, lm-eval), parameter counts, and speed and memory measured for all models in ONE
interleaved run (``evaluators.speed.compare``), so machine noise hits every model alike.

    LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/eval_exports.py \\
        smollm2-135m runs/r09/export runs/r07/export runs/r05/export \\
        --names dense,0.9,0.7,0.5 --limit 500 --out experiments/results/exports

Writes ``<out>.json`` (everything, with config, versions, seed, machine, wall time) and
``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators import harness, speed  # noqa: E402
from evaluators.data import dataset_windows  # noqa: E402
from evaluators.environment import environment  # noqa: E402
from evaluators.perplexity import perplexity  # noqa: E402
from search.cli.common import exit_status, parse_args_with_config  # noqa: E402
from space.errors import UserError  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402

log = logging.getLogger("eval_exports")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_for_eval(spec: str, *, dtype: torch.dtype, device: str = "cpu"):
    """(model, tokenizer, source) of a model spec, in eval mode (``load_model`` runs our exports'
    own modelling file, and no other folder's code)."""
    loaded = load_model(spec, dtype=dtype, device=device)
    return loaded.model.eval(), loaded.tokenizer, loaded.source.to_dict()


def wikitext_perplexity(model, tokenizer, *, seqlen: int, windows: int | None) -> float:
    return perplexity(model, dataset_windows(tokenizer, "wikitext2", seqlen=seqlen, limit=windows))


def block_params(model) -> int:
    """Weights of the linear layers inside the decoder blocks (PROTOCOL's ratio base)."""
    layers = model.get_decoder().layers
    return sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))


def evaluate_quality(spec: str, args) -> dict:
    """Perplexity, zero-shot and parameter counts of one model."""
    out = {"spec": spec}
    model, tokenizer, out["source"] = load_for_eval(spec, dtype=DTYPES[args.ppl_dtype])
    out["params"] = sum(p.numel() for p in model.parameters())
    out["block_params"] = block_params(model)
    if args.ppl_windows != 0:
        t0 = time.time()
        out["ppl_wikitext2"] = wikitext_perplexity(model, tokenizer, seqlen=args.ppl_seqlen,
                                                   windows=args.ppl_windows or None)
        out["ppl_time_s"] = time.time() - t0
    if args.tasks:
        if args.zeroshot_dtype != args.ppl_dtype:
            del model
            model, tokenizer, _ = load_for_eval(spec, dtype=DTYPES[args.zeroshot_dtype])
        t0 = time.time()
        out.update(harness.evaluate_zeroshot(model, tokenizer, args.tasks, limit=args.limit,
                                              batch_size=args.batch_size))
        out["zeroshot_time_s"] = time.time() - t0
    return out


def measure_speed(specs: dict[str, str], args) -> dict:
    """One interleaved speed/memory run per dtype over all models."""
    out = {}
    for dtype in args.speed_dtypes:
        models = {name: load_for_eval(spec, dtype=DTYPES[dtype])[0] for name, spec in specs.items()}
        out[dtype] = speed.compare(models, shapes=args.shapes, decode_tokens=args.decode_tokens,
                                   repeats=args.repeats, warmup=args.warmup)
        del models
    return out


def _fmt(value, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def table(names: list[str], quality: dict, speeds: dict) -> str:
    """The Markdown table: one row per model, ratios against the first."""
    dense = quality[names[0]]
    header = ["model", "params (M)", "params ratio", "block ratio", "WikiText-2 ppl", "zero-shot avg"]
    for dtype, result in speeds.items():
        batch, length = result["config"]["shapes"][-1]
        header += [f"prefill {batch}x{length} speedup ({dtype})", f"decode speedup ({dtype})",
                   f"peak memory ratio ({dtype})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        q = quality[name]
        row = [name, _fmt(q["params"] / 1e6, ".1f"), _fmt(q["params"] / dense["params"], ".3f"),
               _fmt(q["block_params"] / dense["block_params"], ".3f"),
               _fmt(q.get("ppl_wikitext2")), _fmt(100 * q["zeroshot_avg"] if "zeroshot_avg" in q else None)]
        for result in speeds.values():
            ratios = result["ratios"][name]
            row += [_fmt(ratios["prefill_tokens_per_s"][-1]["ratio"]), _fmt(ratios["decode_tokens_per_s"]),
                    _fmt(ratios["peak_memory_bytes"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate the dense model and exported subnets; write one table.")
    parser.add_argument("models", nargs="*", default=[],  # "+", but a --config file may name them
                        help="model specs: the dense model first, then export folders")
    parser.add_argument("--names", help="comma-separated row names (default: the specs)")
    parser.add_argument("--tasks", default="all", help="zero-shot tasks, comma-separated; 'none' to skip")
    parser.add_argument("--limit", type=int, default=500, help="first N examples per task (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--zeroshot-dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--ppl-dtype", default="float32", choices=DTYPES)
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--ppl-windows", type=int, default=32, help="first N windows (-1 = all, 0 = skip)")
    parser.add_argument("--speed-dtypes", default="bfloat16,float32", help="comma-separated; 'none' to skip")
    parser.add_argument("--shapes", default="1x128,1x512,4x512", help="prefill shapes batch x length")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/exports"),
                        help="output path without suffix (.json and .md are written)")
    args = parse_args_with_config(parser, argv)
    if not args.models:
        parser.error("the following arguments are required: models")
    return args


def validate(args) -> argparse.Namespace:
    """Turn strings into values; raise UserError with one message on bad input."""
    names = args.names.split(",") if args.names else list(args.models)
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise UserError("--names needs one distinct name per model")
    args.names = names
    args.tasks = [] if args.tasks == "none" else harness.parse_tasks(args.tasks)
    args.limit = args.limit or None
    args.ppl_windows = None if args.ppl_windows < 0 else args.ppl_windows
    args.speed_dtypes = [] if args.speed_dtypes == "none" else args.speed_dtypes.split(",")
    if any(d not in DTYPES for d in args.speed_dtypes):
        raise UserError(f"--speed-dtypes: choose from {', '.join(DTYPES)}")
    try:
        args.shapes = speed.parse_shapes(args.shapes)
    except ValueError as exc:
        raise UserError(f"--shapes: {exc}") from exc
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return exit_status(lambda: run(validate(parse_args(argv))))


def run(args) -> int:
    started = time.time()
    torch.manual_seed(0)
    specs = dict(zip(args.names, args.models))
    quality = {name: evaluate_quality(spec, args) for name, spec in specs.items()}
    speeds = measure_speed(specs, args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"config": config, "seed": 0, "environment": environment(), "models": quality,
              "speed": speeds, "wall_time_s": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), report)
    args.out.with_suffix(".md").write_text(table(args.names, quality, speeds))
    print(table(args.names, quality, speeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
