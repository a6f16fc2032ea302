"""``llm-pruner search``: architecture search over per-layer widths (resumable, distributed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from evaluators.data import DATASETS, check_calibration, load_text, parse_dataset
from reform.lstsq import RIDGES
from reform.spec import MODES, PASS_DTYPES
from search.cli import common
from search.config import DTYPES, EXPORT_SELECTIONS, SEARCH_METHODS, SOLVER_DEVICES, WINDOW_SETS, SearchConfig
from search.defaults import ORDER_SWITCH_RATIO
from search.job import run_search
from search.plan import describe, plan_for
from search.rundir import check_run_dir
from search.samplers import SAMPLERS
from search.samplers.evolution import PRESETS as EVOLUTION
from search.samplers.staged import PRESETS as STAGED
from search.widths import PRESETS as WIDTHS
from space.errors import UserError, require_extra
from space.export import write_json
from space.models import resolve


def add(sub) -> None:
    p = sub.add_parser("search", help="architecture search over per-layer widths (resumable, distributed)")
    p.add_argument("--config", dest="config_file", type=Path, help="a YAML file of the search's settings (SearchConfig fields; a run's "
                                                "config.yaml re-runs it); the flags given override it")
    p.add_argument("--model", help="HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--ratio", type=common.ratio, help="kept fraction of block weights (nsga2: the top of the range)")
    p.add_argument("--method", choices=list(SEARCH_METHODS),
                   help="a published search system's settings (tyr: Týr-the-Pruner); the flags given override them")
    p.add_argument("--ratio-min", type=common.ratio, help="nsga2: the bottom of the ratio range")
    p.add_argument("--searcher", default="evolution", help=" | ".join(SAMPLERS))
    p.add_argument("--trials", type=int, help="trials to reach (default: 340 staged-8, 260 staged, else 100; a re-run may raise it)")
    p.add_argument("--run-dir", required=True, type=Path, help="run folder (re-running the command resumes it)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors (0: evaluate in this process); at most the "
                                                          "cluster's GPUs / --gpus-per-worker where it has GPUs")
    p.add_argument("--gpus-per-worker", type=int, default=1,
                   help="GPUs one worker's model spans, placed over them with a device map (default 1)")
    p.add_argument("--ray-address", help="join an existing Ray cluster (e.g. auto)")
    p.add_argument("--storage", help="an Optuna RDB URL instead of the run folder's journal file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="wide", help="per-layer width bounds: " + " | ".join(WIDTHS))
    p.add_argument("--mlp-step", type=int, help="MLP width step (default: about 1/48 of the width)")
    p.add_argument("--evolution", help="evolution sizes (default staged-8): " + " | ".join([*EVOLUTION, *STAGED]) +
                   " (staged: selection in stages with level-switch mutations)")
    p.add_argument("--importance", help=f"unit order (default auto: osscar to ratio {ORDER_SWITCH_RATIO}, wanda-sp above)")
    p.add_argument("--fitness-reform", default="lstsq", help="lstsq | none: rectify candidates before scoring")
    p.add_argument("--fitness-statistics", default="dense", choices=("dense", "upstream"),
                   help="what the fitness's least squares fits on: the dense model's inputs (default), or those "
                        "of the model pruned like the search's first start (Týr's statistics; one more pass)")
    p.add_argument("--fitness", help="kl | ppl: KL to the dense model (default), or calibration perplexity")
    p.add_argument("--fitness-top-k", type=int, default=256, help="kl: dense tokens kept per position (default 256)")
    p.add_argument("--fitness-nsamples", type=int, help="fitness windows (default 8; staged evolution: the pool "
                                                          "its stages draw from: 84 for staged and staged-8)")
    p.add_argument("--fitness-seqlen", type=int, default=512)
    p.add_argument("--pruner", default="none", help="none | median (stop hopeless candidates early; in-process)")
    p.add_argument("--final-top-k", type=int, default=5, help="re-score this many of the best at the end")
    p.add_argument("--max-failures", type=int, default=3,
                   help="stop the job (exit 1) after this many evaluations fail in a row (default 3)")
    p.add_argument("--trial-timeout", type=float, help="Ray workers: seconds after which a job's worker is taken "
                                                        "for stuck, restarted, and the job sent again (default: "
                                                        "max(60, 10 x the median so far))")
    add_export_options(p)
    common.add_calibration_flags(p)
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows for scores and least squares")
    p.add_argument("--order-nsamples", type=int, help="calibration windows the unit order is computed on, of the "
                                                      "statistics' region and seed (default: 256 for the osscar "
                                                      "order where --nsamples is fewer, else --nsamples)")
    p.add_argument("--order-calib", help="the unit order's text, of the statistics' region (default: --calib's; "
                                         "sources joined by +, e.g. wikitext2+c4:calib: the search and its least "
                                         "squares still fit --calib's)")
    p.add_argument("--calib-seqlen", type=int, default=512)
    add_precision_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the memory plan per worker and stop (the model may "
                                                          "be a folder with only its config.json)")
    p.add_argument("--json", type=Path, help="--dry-run: also write the plan here")
    p.add_argument("--gpu-memory", type=float, help="GB of the device a worker runs on, when none is visible here")
    p.set_defaults(validate=validate, main=main)
    DEFAULTS.update({action.dest: action.default for action in p._actions})


def add_precision_options(p) -> None:
    """The dtypes the search computes in, its device, and where the fitness's least-squares state lives."""
    p.add_argument("--dtype", help="dtype candidates are scored in: auto (default: bfloat16 on a GPU and on a CPU "
                                   "where its matmuls measure faster, e.g. AVX-512 BF16 or AMX; float32 on other CPUs) | " + " | ".join(DTYPES))
    p.add_argument("--pass-dtype", choices=("auto", *PASS_DTYPES),
                   help="the dtype of the search's own calibration passes, the unit order's and the fitness "
                        "statistics' (the statistics stay float64, the solves read float32 weights); default "
                        "float32 (bfloat16 moved the osscar order: experiments/results/pass_dtype.md); auto: as "
                        "--dtype's auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--solver-dtype", default="auto", help="dtype of the fitness's least-squares state (L⁻¹, P): "
                                                          "auto (--dtype on a GPU, float32 on the CPU) | "
                                                          + " | ".join(DTYPES))
    p.add_argument("--solver-device", default="model", choices=SOLVER_DEVICES,
                   help="where that state lives: on the model's device, or in (pinned) host memory, each solve "
                        "copying one layer's rows to the model's device")


def add_export_options(p) -> None:
    """How the winner is rectified and measured."""
    p.add_argument("--export-reform", choices=MODES,
                   help="least squares of the winner: upstream (default: on the pruned upstream model's inputs), "
                        "local (as in the fitness) or sequential")
    p.add_argument("--export-pass-dtype", choices=("auto", *PASS_DTYPES),
                   help="upstream export: the dtype its calibration passes run in (statistics stay float64); "
                        "auto (default): as --dtype's auto")
    p.add_argument("--export-select", choices=EXPORT_SELECTIONS,
                   help="upstream export: each layer keeps the prefix of the importance order, or the units "
                        "chosen again on the upstream statistics at the winner's widths (obs); auto (default): "
                        "obs where the export's text joins several sources and the order was not made by the "
                        "refit error (osscar, obs-elimination, ziplm)")
    p.add_argument("--export-ridge", choices=RIDGES,
                   help="what the export's least-squares ridge pulls toward: zero, or the dense kept weights "
                        "(then --export-damping sets how far the tokens may move them)")
    p.add_argument("--export-damping", type=float,
                   help="the export's ridge relative to mean(diag XᵀX) (default: --damping, the fitness's)")
    p.add_argument("--export-calib",
                   help="the text of the export's least squares: auto (default: the statistics' text, with "
                        "c4:calib beside wikitext2), or sources joined by + (e.g. wikitext2, my.jsonl:text)")
    p.add_argument("--eval-windows", type=int, default=32, help="export's test windows of 2048 per dataset (0: skip)")
    p.add_argument("--eval-datasets", type=common.ppl_list, default=list(SearchConfig.eval_datasets),
                   help="the export's perplexity (default: wikitext2,ptb,c4:heldout)")
    p.add_argument("--export-nsamples", type=int, help="calibration windows of the export's least squares (default "
                                                      "256; the statistics' text, region and seed)")


DEFAULTS: dict = {}  # the parser's defaults: a flag whose value differs was given, and overrides --config
CALIBRATION_FLAGS = ("calib", "chat_template", "nsamples", "calib_seqlen", "fitness_nsamples", "fitness_seqlen", "seed")
FIELDS = {f.name for f in dataclasses.fields(SearchConfig)}
# The flags a --method sets have the parser default None (so that a flag given with the plain default
# still overrides the method); left None, SearchConfig.create gives them the defaults of the day.


def config_from(args) -> SearchConfig:
    if args.config_file is not None:
        if args.method is not None:
            raise UserError("--method and --config both set the search's settings; give one of them")
        return config_from_file(args)
    for dest, value in (SEARCH_METHODS[args.method] if args.method else {}).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.model is None or args.ratio is None:
        raise UserError("--model and --ratio are required (or a --config file that sets them)")
    return SearchConfig.create(
        args.model, args.ratio, calib=args.calib, chat_template=args.chat_template, nsamples=args.nsamples,
        calib_seqlen=args.calib_seqlen,
        fitness_nsamples=args.fitness_nsamples, fitness_seqlen=args.fitness_seqlen, seed=args.seed,
        ratio_min=args.ratio_min, searcher=args.searcher, trials=args.trials, preset=args.preset,
        mlp_step=args.mlp_step, evolution=args.evolution, importance=args.importance,
        fitness_reform=args.fitness_reform, fitness_statistics=args.fitness_statistics, fitness=args.fitness,
        fitness_top_k=args.fitness_top_k, dtype=args.dtype, pass_dtype=args.pass_dtype, device=args.device,
        solver_dtype=args.solver_dtype, solver_device=args.solver_device, pruner=args.pruner,
        final_top_k=args.final_top_k, export_reform=args.export_reform, export_nsamples=args.export_nsamples,
        order_nsamples=args.order_nsamples, order_calib=args.order_calib,
        export_pass_dtype=args.export_pass_dtype, export_select=args.export_select, export_calib=args.export_calib,
        export_ridge=args.export_ridge, export_damping=args.export_damping, eval_windows=args.eval_windows or 0,
        eval_datasets=tuple(args.eval_datasets), max_failures=args.max_failures,
        trial_timeout=args.trial_timeout, gpus_per_worker=args.gpus_per_worker,
    )


def config_from_file(args) -> SearchConfig:
    """The config of ``--config``, with the flags the command gave on top (the calibration flags
    rebuild the three disjoint window regions from the file's values and theirs)."""
    path = args.config_file
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text())
    unknown = sorted(set(values) - FIELDS) if isinstance(values, dict) else None
    if unknown is None or unknown:
        raise UserError(f"--config {path} must map search settings ({', '.join(sorted(FIELDS))}) to values"
                        + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if "eval_datasets" in values:
        values["eval_datasets"] = tuple(values["eval_datasets"])
    if values.get("model") is None or values.get("ratio") is None:
        raise UserError(f"--config {path} must set model and ratio")
    # what the file leaves out takes the defaults of the day, as on the command line; what it sets stays, a null
    # order_nsamples too (the statistics' windows, as a run folder's config.yaml records it)
    kept = {k: values.pop(k) for k in (*WINDOW_SETS, "order_nsamples") if k in values}
    statistics = {"nsamples": kept["calibration"]["nsamples"]} if "calibration" in kept else {}
    base = dataclasses.replace(SearchConfig.create(values.pop("model"), values.pop("ratio"), **statistics, **values),
                               **kept)
    given = {dest: value for dest, value in vars(args).items() if dest in DEFAULTS and value != DEFAULTS[dest]}
    changes = {dest: value for dest, value in given.items() if dest in FIELDS}
    if "eval_datasets" in changes:
        changes["eval_datasets"] = tuple(changes["eval_datasets"])
    if any(flag in given for flag in CALIBRATION_FLAGS):
        statistics, fitness = base.calibration_spec(), base.calibration_spec("fitness_windows")
        merged = {"calib": statistics.dataset, "chat_template": statistics.chat_template,
                  "nsamples": statistics.nsamples, "calib_seqlen": statistics.seqlen,
                  "fitness_nsamples": fitness.nsamples, "fitness_seqlen": fitness.seqlen, "seed": base.seed,
                  **{flag: given[flag] for flag in CALIBRATION_FLAGS if flag in given}}
        rebuilt = SearchConfig.create(base.model, base.ratio, searcher=base.searcher, evolution=base.evolution, **merged)
        changes.update(calibration=rebuilt.calibration, fitness_windows=rebuilt.fitness_windows,
                       final_windows=rebuilt.final_windows)
    return dataclasses.replace(base, **changes)


def validate(args) -> None:
    if args.workers < 0:
        raise UserError("--workers must be >= 0")
    args.config = config_from(args)
    args.config.check()
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise UserError("--gpu-memory must be a positive number of GB")
    if args.dry_run:
        resolve(args.config.model)
        return
    for spec in (args.config.calibration_spec(), args.config.order_calibration_spec(),
                 args.config.export_calibration_spec()):
        spec.check_text()  # a missing or test split fails before the model loads
    check_run_dir(args.run_dir)
    if args.storage:
        check_storage_url(args.storage)
    if args.config.eval_windows != 0:
        for spec in args.config.eval_datasets:  # the texts the export is measured on exist
            name, split = parse_dataset(spec)
            load_text(name, split or DATASETS[name].eval_split)
    resolve(args.config.model)
    # too little text for any of the three window sets, or no chat template: said before the model loads
    tokenizer = common.model_tokenizer(args.config.model)
    if tokenizer is not None:
        check_calibration([*(args.config.calibration_spec(which) for which in WINDOW_SETS),
                           args.config.order_calibration_spec()], tokenizer)
    if args.workers:
        require_extra("ray", "ray", "--workers")
    if args.config.gpus_per_worker > 1 and args.config.device.startswith("cuda"):
        require_extra("accelerate", "multi-gpu", "--gpus-per-worker above 1")


def check_storage_url(url: str) -> None:
    """A malformed URL or an unknown database driver, refused before anything is written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise UserError(f"--storage {url!r} is not a database URL Optuna can open ({exc}); "
                        "e.g. sqlite:///study.db or postgresql://user@host/db") from None


def main(args) -> int:
    if args.dry_run:
        plan = plan_for(args.config, gpu_memory_gb=args.gpu_memory, run_dir=args.run_dir)
        print(describe(plan))
        if args.json:
            write_json(args.json, plan)
        return 0
    result = run_search(args.config, args.run_dir, workers=args.workers, ray_address=args.ray_address,
                        storage_url=args.storage, progress=not args.quiet)
    best = result.best
    print(f"\n{result.completed} trials in {args.run_dir}")
    if best:
        b = best["best"]
        print(f"best: trial {b['trial']}, block ratio {b['block_ratio']:.4f}, {args.config.fitness_name} "
              f"{b['search_value']:.3f} (re-scored {b['rescored']:.3f})")
        if best.get("test"):
            t = best["test"]
            others = "".join(f", {spec} {h['ppl']:.3f}" for spec, h in best.get("held_out", {}).items())
            print(f"export: {best['export']}  perplexity: WikiText-2 test {t['ppl']:.3f}{others} "
                  f"({t['windows']} x {t['seqlen']} each, {t['dtype']})")
        print(f"report: {args.run_dir / 'report.md'}")
    print(f"dashboard: llm-pruner dashboard {args.run_dir}")
    return 0
