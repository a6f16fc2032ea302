"""The ``llm-pruner`` command.

Each subcommand is a parser, a validation step that checks everything a user can get wrong
before any model is loaded, and a main that does the work. Mistakes a user can make end with
one message on stderr and exit status 2; nothing already written is left half-done.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

from space.errors import UserError

log = logging.getLogger("llm_pruner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFORM_NSAMPLES = 128  # calibration windows of the reformation (the paper's count)


# --- shared options --------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own code to run")


def _add_calibration_options(parser: argparse.ArgumentParser, *, nsamples: int = 64) -> None:
    parser.add_argument("--calib", default="wikitext2", help="calibration dataset (never a test split)")
    parser.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size")


def _add_reform_options(parser: argparse.ArgumentParser, *, method_flag: str, mode_flag: str) -> None:
    from reform.methods import METHODS
    from reform.rectify import DEFAULT_METHOD, DEFAULT_MODE, DRIVERS, ReformSpec

    defaults = ReformSpec()
    parser.add_argument(method_flag, dest="reform_method", choices=list(METHODS), default=DEFAULT_METHOD,
                        help="rectification of o_proj/down_proj: "
                             + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
                             + f" (default {DEFAULT_METHOD})")
    parser.add_argument(mode_flag, dest="reform_mode", choices=list(DRIVERS),
                        help="local: dense inputs; sequential: inputs from the pruned upstream model "
                             f"(default {DEFAULT_MODE} where the method has it, else local)")
    parser.add_argument("--damping", type=float, default=defaults.damping,
                        help=f"least-squares ridge, relative to mean(diag XᵀX) (default {defaults.damping:g})")
    parser.add_argument("--admm-rho", type=float, default=defaults.rho,
                        help=f"ADMM penalty, relative to mean(diag XᵀX) (default {defaults.rho:g})")
    parser.add_argument("--admm-iterations", type=int, default=defaults.iterations,
                        help=f"ADMM iterations (default {defaults.iterations})")


def _reform_spec(args):
    from reform.methods import method_spec
    from reform.rectify import DEFAULT_MODE, ReformSpec

    mode = args.reform_mode or (DEFAULT_MODE if method_spec(args.reform_method).sequential else "local")
    return ReformSpec(args.reform_method, mode, damping=args.damping, rho=args.admm_rho,
                      iterations=args.admm_iterations)


def _ppl_list(text: str) -> list[str]:
    from evaluators.data import parse_dataset

    names = [t for t in (s.strip() for s in text.split(",")) if t and t != "none"]
    for name in names:
        parse_dataset(name)
    return names


def _ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}")
    if not 0 < ratio <= 1 or math.isnan(ratio):
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1] (the kept fraction of block weights), got {value}")
    return ratio


def _progress(quiet: bool):
    from tqdm.auto import tqdm

    def wrap(iterable, **kwargs):
        return iterable if quiet else tqdm(iterable, leave=False, **kwargs)

    return wrap


# --- prune -----------------------------------------------------------------------------------


def _recipes() -> list[str]:
    from search.recipes import RECIPES

    return list(RECIPES)


def _scores() -> list[str]:
    from space.importance import SCORES

    return sorted(SCORES)


def add_prune(sub) -> None:
    p = sub.add_parser("prune", help="one-shot structured pruning to a budget, exported as a HF folder")
    p.add_argument("--model", required=True, help="HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--ratio", required=True, type=_ratio, help="kept fraction of block weights, in (0, 1]")
    p.add_argument("--method", help="a published system's recipe (its importance, allocation, compensation and "
                                    "calibration): " + " | ".join(_recipes()))
    p.add_argument("--importance", help="score (default wanda-sp; with --method, replaces the recipe's score): "
                                        + " | ".join(_scores()))
    p.add_argument("--allocation", default="uniform-mlp", help="uniform | uniform-mlp | global")
    p.add_argument("--mlp-step", type=int, default=1, help="MLP widths in multiples of this (default 1)")
    p.add_argument("--out", required=True, type=Path, help="export folder (created or replaced if ours)")
    p.add_argument("--save-dtype", choices=sorted(DTYPES), help="dtype of the exported weights (default: as loaded)")
    p.add_argument("--eval", dest="eval_ppl", type=_ppl_list, default=[], help="perplexity after export, e.g. wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--limit-windows", type=int, help="evaluate only the first N windows")
    _add_reform_options(p, method_flag="--reform", mode_flag="--reform-mode")
    p.add_argument("--reform-nsamples", type=int, default=REFORM_NSAMPLES,
                   help=f"calibration windows for the reformation (default {REFORM_NSAMPLES}; "
                        "same --calib, --calib-seqlen and --seed)")
    _add_model_options(p)
    _add_calibration_options(p)
    p.set_defaults(validate=validate_prune, main=main_prune)


def validate_prune(args) -> None:
    from evaluators.data import CalibrationSpec
    from search.allocation import ALLOCATIONS
    from space.export import check_destination
    from space.importance import score_spec
    from space.models import resolve

    if args.method is not None:
        from search.recipes import recipe_spec

        recipe_spec(args.method)
    args.importance = args.importance or ("wanda-sp" if args.method is None else None)
    if args.importance is not None:
        score_spec(args.importance)
    if args.allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {args.allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if args.mlp_step < 1:
        raise UserError("--mlp-step must be at least 1")
    args.calibration = CalibrationSpec(args.calib, args.nsamples, args.calib_seqlen, args.seed)
    args.reform = _reform_spec(args)
    args.reform_calibration = CalibrationSpec(args.calib, args.reform_nsamples, args.calib_seqlen, args.seed)
    check_destination(args.out)
    resolve(args.model)


def main_prune(args) -> int:
    from evaluators.data import load_text, parse_dataset
    from search.oneshot import prune_one_shot
    from space.export import update_subnet_record
    from space.models import load_model

    name, split = parse_dataset(args.calib)
    load_text(name, split or ("train" if name == "c4" else "validation"))  # fail before loading the model
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device,
                        trust_remote_code=args.trust_remote_code)
    if args.method is not None:
        from search.recipes import prune_with_recipe

        subnet = prune_with_recipe(
            loaded, args.method, ratio=args.ratio, out_dir=args.out, importance=args.importance,
            batch_size=args.batch_size, save_dtype=DTYPES[args.save_dtype] if args.save_dtype else None,
            progress=_progress(args.quiet),
        ).subnet
    else:
        subnet, _ = prune_one_shot(
            loaded, ratio=args.ratio, importance=args.importance, allocation=args.allocation,
            calibration=args.calibration, out_dir=args.out, reform=args.reform,
            reform_calibration=args.reform_calibration, mlp_step=args.mlp_step, batch_size=args.batch_size,
            save_dtype=DTYPES[args.save_dtype] if args.save_dtype else None, progress=_progress(args.quiet),
        )
    print(f"exported {args.out}: block ratio {subnet.ratio():.4f}, total params {subnet.total_params():,} "
          f"({subnet.total_ratio():.1%} of the model)")
    if args.eval_ppl:
        del loaded
        result = evaluate(str(args.out), args.eval_ppl, seqlen=args.eval_seqlen, limit=args.limit_windows,
                          dtype=args.dtype, device=args.device, batch_size=1, quiet=args.quiet)
        update_subnet_record(args.out, metrics=result)
        print_eval_table(result)
    return 0


# --- reform ----------------------------------------------------------------------------------


def add_reform(sub) -> None:
    p = sub.add_parser("reform", help="rectify an existing export again, from its source model")
    p.add_argument("export", type=Path, help="an export of ours (its subnet.json names the source and kept units)")
    p.add_argument("--out", required=True, type=Path, help="export folder to write (may be the same folder)")
    p.add_argument("--save-dtype", choices=sorted(DTYPES), help="dtype of the exported weights (default: as loaded)")
    _add_reform_options(p, method_flag="--method", mode_flag="--mode")
    _add_model_options(p)
    _add_calibration_options(p, nsamples=REFORM_NSAMPLES)
    p.set_defaults(validate=validate_reform, main=main_reform)


def validate_reform(args) -> None:
    from evaluators.data import CalibrationSpec, load_text, parse_dataset
    from space.export import check_destination, read_subnet_record
    from space.models import resolve

    args.record = read_subnet_record(args.export)
    missing = [key for key in ("source", "subnet", "kept") if key not in args.record]
    if missing:
        raise UserError(f"{args.export}/subnet.json lacks {', '.join(missing)}; it cannot be rectified again")
    args.reform = _reform_spec(args)
    args.calibration = CalibrationSpec(args.calib, args.nsamples, args.calib_seqlen, args.seed)
    check_destination(args.out)
    args.source = args.record["source"]["path"]  # absolute for folders and files; the id for the hub
    resolve(args.source)
    name, split = parse_dataset(args.calib)
    load_text(name, split or ("train" if name == "c4" else "validation"))


def main_reform(args) -> int:
    from search.oneshot import reform_export
    from space.models import load_model

    loaded = load_model(args.source, dtype=DTYPES[args.dtype], device=args.device,
                        trust_remote_code=args.trust_remote_code)
    subnet, record = reform_export(
        loaded, args.record, reform=args.reform, calibration=args.calibration, out_dir=args.out,
        reformed_from=str(args.export), batch_size=args.batch_size,
        save_dtype=DTYPES[args.save_dtype] if args.save_dtype else None, progress=_progress(args.quiet),
    )
    print(f"exported {args.out}: {args.reform.method} ({args.reform.mode}) in {record['seconds']['reform']:.1f} s, "
          f"block ratio {subnet.ratio():.4f}")
    return 0


# --- eval ------------------------------------------------------------------------------------


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or export")
    p.add_argument("model", help="HF folder (exports of ours included), hub id, .gguf file, or alias")
    p.add_argument("--ppl", type=_ppl_list, default=["wikitext2"],
                   help="datasets, e.g. wikitext2,ptb,c4:train; 'none' for no perplexity")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit-windows", type=int, help="only the first N windows of each dataset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--zeroshot", help="zero-shot tasks as lm-evaluation-harness scores them, comma-separated "
                                      "(boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa or all)")
    p.add_argument("--limit", type=int, help="zero-shot: only the first N examples of each task")
    p.add_argument("--zeroshot-batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the result here")
    _add_model_options(p)
    p.set_defaults(validate=validate_eval, main=main_eval)


def validate_eval(args) -> None:
    from space.models import resolve

    if args.seqlen < 2:
        raise UserError("--seqlen must be at least 2")
    if args.limit_windows is not None and args.limit_windows < 1:
        raise UserError("--limit-windows must be at least 1")
    if args.json is not None and not args.json.parent.exists():
        raise UserError(f"cannot write {args.json}: its folder does not exist")
    if args.zeroshot is not None:
        from evaluators.zeroshot import parse_tasks

        args.zeroshot = parse_tasks(args.zeroshot)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if not args.ppl and not args.zeroshot:
        raise UserError("nothing to evaluate: give --ppl datasets or --zeroshot tasks")
    resolve(args.model)


def evaluate(spec: str, datasets: list[str], *, seqlen: int, limit: int | None, dtype: str, device: str,
             batch_size: int, quiet: bool, trust_remote_code: bool = False, zeroshot: list[str] | None = None,
             zeroshot_limit: int | None = None, zeroshot_batch_size: int = 16) -> dict:
    """Perplexity of ``spec`` on each dataset (and its zero-shot scores), with everything needed
    to reproduce it."""
    from evaluators.data import dataset_windows
    from evaluators.environment import environment
    from evaluators.perplexity import count_params, perplexity
    from space.models import load_model, resolve

    started = time.time()
    source = resolve(spec)
    loaded = load_model(spec, dtype=DTYPES[dtype], device=device, trust_remote_code=trust_remote_code)
    windows = {name: dataset_windows(loaded.tokenizer, name, seqlen=seqlen, limit=limit) for name in datasets}
    ppl, counts, seconds = {}, {}, {}
    for name, w in windows.items():
        t = time.time()
        ppl[name] = perplexity(loaded.model, w, batch_size=batch_size,
                               progress=lambda it, **kw: _progress(quiet)(it, desc=name, **kw))
        counts[name] = int(w.shape[0])
        seconds[name] = round(time.time() - t, 3)
    scores = {}
    if zeroshot:
        from evaluators.zeroshot import evaluate_zeroshot

        t = time.time()
        scores = evaluate_zeroshot(loaded.model, loaded.tokenizer, zeroshot, limit=zeroshot_limit,
                                   batch_size=zeroshot_batch_size, progress=not quiet)
        seconds["zeroshot"] = round(time.time() - t, 3)
    return {
        "model": source.to_dict(),
        "ppl": ppl,
        "seqlen": seqlen,
        "windows": counts,
        "limit_windows": limit,
        "dtype": dtype,
        "device": device,
        "params": count_params(loaded.model),
        **scores,
        "seconds": {"per_dataset": seconds, "total": round(time.time() - started, 3)},
        "environment": environment(),
    }


def print_eval_table(result: dict) -> None:
    if result["ppl"]:
        print(f"\n| dataset | windows x {result['seqlen']} | perplexity |\n|---|---|---|")
        for name, value in result["ppl"].items():
            print(f"| {name} | {result['windows'][name]} | {value:.3f} |")
    if result.get("zeroshot"):
        print("\n| task | examples | metric | score |\n|---|---|---|---|")
        for name, task in result["zeroshot"].items():
            print(f"| {name} | {task['n']} | {task['metric']} | {100 * task[task['metric']]:.2f} |")
        print(f"| average | | | {100 * result['zeroshot_avg']:.2f} |")
    params = result["params"]
    print(f"\nblock params {params['block']:,}, total params {params['total']:,}, dtype {result['dtype']}")


def main_eval(args) -> int:
    from space.export import write_json

    result = evaluate(args.model, args.ppl, seqlen=args.seqlen, limit=args.limit_windows, dtype=args.dtype,
                      device=args.device, batch_size=args.batch_size, quiet=args.quiet,
                      trust_remote_code=args.trust_remote_code, zeroshot=args.zeroshot, zeroshot_limit=args.limit,
                      zeroshot_batch_size=args.zeroshot_batch_size)
    print_eval_table(result)
    if args.json is not None:
        write_json(args.json, result)
    return 0


# --- bench -----------------------------------------------------------------------------------


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of models measured side by side (ratios against the first)")
    p.add_argument("models", nargs="+", help="the reference (usually the dense model) first, then exports")
    p.add_argument("--shapes", default="1x128,1x512,4x512", help="prefill shapes, batch x length")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens generated with the KV cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the result here")
    _add_model_options(p)
    p.set_defaults(validate=validate_bench, main=main_bench)


def validate_bench(args) -> None:
    from evaluators.speed import parse_shapes
    from space.models import resolve

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


def main_bench(args) -> int:
    from evaluators.environment import environment
    from evaluators.speed import compare
    from space.export import write_json
    from space.models import load_model

    names = [spec if args.models.count(spec) == 1 else f"{spec} #{i}" for i, spec in enumerate(args.models)]
    models = {}
    for name, spec in zip(names, args.models):  # load_model trusts our own exports' modelling file
        models[name] = load_model(spec, dtype=DTYPES[args.dtype], device=args.device,
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


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-pruner", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    from search.recover_cli import add_recover

    from search.run_cli import add_dashboard, add_search

    for add in (add_prune, add_reform, add_eval, add_bench, add_search, add_dashboard, add_recover):
        add(sub)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        args.validate(args)
        return args.main(args)
    except UserError as exc:
        print(f"llm-pruner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-pruner {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
