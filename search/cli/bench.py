"""``llm-pruner bench``: speed and memory of models measured side by side (ratios against the first)."""

from __future__ import annotations

from pathlib import Path

from evaluators.environment import environment
from evaluators.speed import compare, parse_shapes
from search.cli import common
from space.errors import UserError
from space.export import write_json
from space.models import load_model, resolve


def add(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of models measured side by side (ratios against the first)")
    p.add_argument("models", nargs="+", help="the reference (usually the dense model) first, then exports")
    p.add_argument("--shapes", default="1x128,1x512,4x512", help="prefill shapes, batch x length")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens generated with the KV cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the result here")
    common.add_model_options(p)
    p.set_defaults(validate=validate, main=main)


def validate(args) -> None:
    try:
        args.shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        raise UserError(f"--shapes: {exc}") from exc
    if args.decode_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        raise UserError("need --decode-tokens >= 2, --repeats >= 1 and --warmup >= 0")
    if args.json is not None and not args.json.parent.exists():
        raise UserError(f"cannot write {args.json}: its folder does not exist")
    for spec in args.models:
        resolve(spec)


def main(args) -> int:
    names = [spec if args.models.count(spec) == 1 else f"{spec} #{i}" for i, spec in enumerate(args.models)]
    models = {}
    for name, spec in zip(names, args.models):  # load_model trusts our own exports' modelling file
        models[name] = load_model(spec, dtype=common.DTYPES[args.dtype], device=args.device,
                                  trust_remote_code=args.trust_remote_code).model
    result = compare(models, shapes=args.shapes, decode_tokens=args.decode_tokens, repeats=args.repeats,
                     warmup=args.warmup)
    result["dtype"] = args.dtype
    result["environment"] = environment()
    batch, length = args.shapes[-1]
    print(f"\n| model | params | prefill {batch}x{length} tok/s | decode tok/s | TTFT ms | peak MiB | "
          "prefill speedup | decode speedup |\n|---|---|---|---|---|---|---|---|")
    for name, m in result["models"].items():
        r = result["ratios"][name]
        peak = f"{m['peak_memory_bytes'] / 2**20:.0f}" if m["peak_memory_bytes"] is not None else "–"
        print(f"| {name} | {m['params']:,} | {m['prefill'][-1]['tokens_per_s']:.0f} | "
              f"{m['decode']['tokens_per_s']:.1f} | {1000 * m['ttft_s']:.1f} | {peak} | "
              f"{r['prefill_tokens_per_s'][-1]['ratio']:.2f}x | {r['decode_tokens_per_s']:.2f}x |")
    if args.json is not None:
        write_json(args.json, result)
    return 0
