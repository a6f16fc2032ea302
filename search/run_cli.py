"""The ``search`` and ``dashboard`` subcommands of ``llm-pruner`` (registered in search/cli.py)."""

from __future__ import annotations

from pathlib import Path

from space.errors import UserError


def _ratio(value: str) -> float:
    from search.cli import _ratio as ratio

    return ratio(value)


def add_search(sub) -> None:
    from search.evolution import PRESETS as EVOLUTION
    from search.samplers import SEARCHERS
    from search.widths import PRESETS as WIDTHS

    p = sub.add_parser("search", help="architecture search over per-layer widths (resumable, distributed)")
    p.add_argument("--model", required=True, help="HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--ratio", required=True, type=_ratio, help="kept fraction of block weights (nsga2: the top of the range)")
    p.add_argument("--ratio-min", type=_ratio, help="nsga2: the bottom of the ratio range")
    p.add_argument("--searcher", default="evolution", help=" | ".join(SEARCHERS))
    p.add_argument("--trials", type=int, default=100, help="finished trials to reach (a re-run may raise it)")
    p.add_argument("--run-dir", required=True, type=Path, help="run folder (re-running the command resumes it)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors (0: evaluate in this process)")
    p.add_argument("--ray-address", help="join an existing Ray cluster (e.g. auto)")
    p.add_argument("--storage", help="an Optuna RDB URL instead of the run folder's journal file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="wide", help="per-layer width bounds: " + " | ".join(WIDTHS))
    p.add_argument("--mlp-step", type=int, help="MLP width step (default: about 1/48 of the width)")
    p.add_argument("--evolution", default="cpu", help="evolution sizes: " + " | ".join(EVOLUTION))
    p.add_argument("--importance", default="wanda-sp", help="unit order inside layers and the starts")
    p.add_argument("--fitness-reform", default="lstsq", help="lstsq | none: rectify candidates before scoring")
    p.add_argument("--fitness-nsamples", type=int, default=8)
    p.add_argument("--fitness-seqlen", type=int, default=512)
    p.add_argument("--pruner", default="none", help="none | median (stop hopeless candidates early; in-process)")
    p.add_argument("--final-top-k", type=int, default=5, help="re-score this many of the best at the end")
    p.add_argument("--export-reform", default="local", choices=("local", "sequential"),
                   help="least squares of the winner: local (default, as in the fitness) or sequential")
    p.add_argument("--eval-windows", type=int, default=32, help="WikiText-2 test windows for the export (0: skip)")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows for scores and least squares")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", help="dtype candidates are scored in")
    p.add_argument("--device", default="cpu")
    p.set_defaults(validate=validate_search, main=main_search)


def _config(args):
    from evaluators.data import CalibrationSpec
    from search.job import SearchConfig

    if args.workers < 0:
        raise UserError("--workers must be >= 0")
    calibration = CalibrationSpec(args.calib, args.nsamples, args.calib_seqlen, args.seed)
    fitness = CalibrationSpec(args.calib, args.fitness_nsamples, args.fitness_seqlen, args.seed + 1)
    final = CalibrationSpec(args.calib, max(32, args.fitness_nsamples * 4), args.fitness_seqlen, args.seed + 2)
    return SearchConfig(
        model=args.model, ratio=args.ratio, ratio_min=args.ratio_min, searcher=args.searcher, trials=args.trials,
        seed=args.seed, preset=args.preset, mlp_step=args.mlp_step, evolution=args.evolution,
        importance=args.importance, calibration=calibration.to_dict(), fitness_windows=fitness.to_dict(),
        fitness_reform=args.fitness_reform, dtype=args.dtype, device=args.device, pruner=args.pruner,
        final_top_k=args.final_top_k, final_windows=final.to_dict(), export_reform=args.export_reform,
        eval_windows=args.eval_windows or 0,
    )


def validate_search(args) -> None:
    from search.widths import PRESETS
    from space.importance import score_spec
    from space.models import resolve

    args.config = _config(args)
    args.config.check()
    if args.preset not in PRESETS:
        raise UserError(f"unknown width preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError("--dtype must be float32, bfloat16 or float16")
    score_spec(args.importance)
    resolve(args.model)
    if args.workers and not _has_ray():
        raise UserError("--workers needs Ray: pip install 'llm-pruner[ray]'")


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def main_search(args) -> int:
    from search.job import run_search

    result = run_search(args.config, args.run_dir, workers=args.workers, ray_address=args.ray_address,
                        storage_url=args.storage, progress=not args.quiet)
    best = result.best
    print(f"\n{result.completed} trials in {args.run_dir}")
    if best:
        b = best["best"]
        print(f"best: trial {b['trial']}, block ratio {b['block_ratio']:.4f}, calibration ppl "
              f"{b['search_value']:.3f} (re-scored {b['rescored']:.3f})")
        if best.get("test"):
            t = best["test"]
            print(f"export: {best['export']}  WikiText-2 test ppl {t['ppl']:.3f} "
                  f"({t['windows']} x {t['seqlen']}, {t['dtype']})")
        print(f"report: {args.run_dir / 'report.md'}")
    print(f"dashboard: llm-pruner dashboard {args.run_dir}")
    return 0


# --- dashboard -------------------------------------------------------------------------------


def add_dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="serve a run's study with optuna-dashboard on 127.0.0.1")
    p.add_argument("run_dir", type=Path, help="a search run folder (or a study.journal file)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(validate=validate_dashboard, main=main_dashboard)


def journal_path(run_dir: Path) -> Path:
    from search.job import JOURNAL

    return run_dir if run_dir.is_file() else run_dir / JOURNAL


def validate_dashboard(args) -> None:
    import importlib.util

    if not journal_path(args.run_dir).is_file():
        raise UserError(f"no study journal in {args.run_dir}")
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UserError("the dashboard needs optuna-dashboard: pip install 'llm-pruner[dashboard]'")
    if not 0 < args.port < 65536:
        raise UserError("--port must be in 1..65535")


def dashboard_app(run_dir: Path):
    """The optuna-dashboard WSGI app of a run folder (study and artifacts)."""
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    path = journal_path(run_dir)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    artifacts = path.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    return wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts)))


def _stop(signum, frame):
    raise KeyboardInterrupt


def main_dashboard(args) -> int:
    import signal
    from wsgiref.simple_server import make_server

    # SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does; a job started in the
    # background by a non-interactive shell ignores SIGINT, so SIGTERM is the portable stop.
    signal.signal(signal.SIGTERM, _stop)
    app = dashboard_app(args.run_dir)
    with make_server(args.host, args.port, app) as server:
        print(f"optuna-dashboard on http://{args.host}:{server.server_port}/ (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0
