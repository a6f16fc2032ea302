"""``llm-pruner prune``: one-shot structured pruning to a budget, by a recipe or by parts."""

from __future__ import annotations

from pathlib import Path

from search.cli import common
from evaluators.suite import eval_table
from search.cli.evaluate import evaluate_path
from search.oneshot import RECIPES, custom_recipe, prune, recipe_spec
from space.errors import UserError
from space.export import check_destination, update_subnet_record
from space.models import load_model, resolve
from space.scores import SCORES, score_spec


def add(sub) -> None:
    p = sub.add_parser("prune", help="one-shot structured pruning to a budget, exported as a HF folder")
    p.add_argument("--config", dest="config_file", type=Path,
                   help="a YAML file of these options (model, ratio, method, calib, nsamples, ...; "
                        "experiments/configs/compare/ holds every compare.md cell's); the flags given override it")
    p.add_argument("--model", help="HF folder, hub id, .gguf file, or alias (smollm2-135m); required")
    p.add_argument("--ratio", type=common.ratio, help="kept fraction of block weights, in (0, 1]; required")
    p.add_argument("--method", help="a published system's recipe (its importance, allocation, compensation and "
                                    "calibration): " + " | ".join(RECIPES))
    p.add_argument("--importance", help="score (default wanda-sp; with --method, replaces the recipe's score): "
                                        + " | ".join(sorted(SCORES)))
    p.add_argument("--allocation", default="uniform-mlp", help="uniform | uniform-mlp | global")
    p.add_argument("--mlp-step", type=int, default=1, help="MLP widths in multiples of this (default 1)")
    p.add_argument("--out", required=True, type=Path, help="export folder (created or replaced if ours)")
    p.add_argument("--save-dtype", choices=sorted(common.DTYPES), help="dtype of the exported weights (default: as loaded)")
    p.add_argument("--eval", dest="eval_ppl", type=common.ppl_list, default=[],
                   help="perplexity after export, e.g. wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--limit-windows", type=int, help="evaluate only the first N windows")
    common.add_reform_options(p, method_flag="--reform", mode_flag="--reform-mode")
    p.add_argument("--reform-nsamples", type=int, default=common.REFORM_NSAMPLES,
                   help=f"calibration windows for the reformation (default {common.REFORM_NSAMPLES}; "
                        "same --calib, --calib-seqlen and --seed)")
    common.add_model_options(p)
    common.add_calibration_options(p)
    p.set_defaults(validate=validate, main=main)
    OPTIONS.update(common.option_actions(p))


OPTIONS: dict = {}  # what --config may set (everything but where the export goes and the run's chatter)


def validate(args) -> None:
    common.apply_config_file(args, OPTIONS, not_in_file=("out",))
    if args.model is None or args.ratio is None:
        raise UserError("--model and --ratio are required (or a --config file that sets them)")
    if args.method is not None:
        recipe_spec(args.method)
        if args.importance is not None:
            score_spec(args.importance)
    else:
        # the anonymous recipe of these settings, checked whole before the model loads
        custom_recipe(importance=args.importance or "wanda-sp", allocation=args.allocation,
                      reform=common.reform_spec(args), calibration=common.calibration_from(args),
                      mlp_step=args.mlp_step)
    check_destination(args.out)
    resolve(args.model)
    if args.method is None:  # too little text for the windows, or no chat template: said before the model loads
        common.calibration_from(args, model=args.model)


def main(args) -> int:
    loaded = load_model(args.model, dtype=common.DTYPES[args.dtype], device=args.device,
                        trust_remote_code=args.trust_remote_code)
    calibration = common.calibration_from(args)
    pruned = prune(loaded, ratio=args.ratio, method=args.method, importance=args.importance,
                   allocation=args.allocation, reform=common.reform_spec(args), calibration=calibration,
                   reform_calibration=common.calibration_from(args, nsamples=args.reform_nsamples),
                   mlp_step=args.mlp_step, out=args.out, save_dtype=common.save_dtype(args),
                   batch_size=args.batch_size, progress=common.progress(args.quiet))
    subnet = pruned.subnet
    print(f"exported {args.out}: block ratio {subnet.ratio():.4f}, total params {subnet.total_params():,} "
          f"({subnet.total_ratio():.1%} of the model)")
    if args.eval_ppl:
        del loaded, pruned
        result = evaluate_path(str(args.out), ppl=args.eval_ppl, seqlen=args.eval_seqlen, limit=args.limit_windows,
                               dtype=args.dtype, device=args.device, quiet=args.quiet)
        update_subnet_record(args.out, metrics=result)
        print(eval_table(result))
    return 0
