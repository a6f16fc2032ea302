"""The end of a search: re-score the best candidates on more calibration text, rectify and export
the winner, measure its test perplexity, and write ``best.json``, ``report.md`` and the pictures
(also attached to the best trials, where the Optuna dashboard shows them)."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import optuna
import torch

from evaluators.environment import environment
from search import report
from space.export import write_json
from space.subnet import Subnet

log = logging.getLogger(__name__)


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best finished trials with distinct widths (single objective)."""
    trials = sorted(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]), key=lambda t: t.value)
    seen, out = set(), []
    for t in trials:
        key = str(t.user_attrs.get("widths"))
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) == k:
            break
    return out


def front_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return sorted(study.best_trials, key=lambda t: t.values[1])


def _subnet(trial: optuna.trial.FrozenTrial, dims) -> Subnet:
    from space.subnet import LayerWidths

    return Subnet(dims, [LayerWidths(*w) for w in trial.user_attrs["widths"]])


def artifact_store(run_dir: Path):
    from optuna.artifacts import FileSystemArtifactStore

    (run_dir / "artifacts").mkdir(exist_ok=True)
    return FileSystemArtifactStore(str(run_dir / "artifacts"))


def attach_profile(study: optuna.Study, trial, subnet: Subnet, run_dir: Path) -> None:
    """A width-profile picture on a running trial (finished trials cannot take artifacts)."""
    from optuna.artifacts import upload_artifact

    png = report.width_profile(subnet, run_dir / f".profile-{trial.number}.png",
                               title=f"trial {trial.number}: block ratio {subnet.ratio():.3f}")
    try:
        upload_artifact(artifact_store=artifact_store(run_dir), file_path=str(png), study_or_trial=trial,
                        storage=study._storage, mimetype="image/png")
    finally:
        png.unlink(missing_ok=True)


def attach_summary(study: optuna.Study, run_dir: Path, trials, dims) -> None:
    """The run's pictures on the study, and a note on each of the best trials, for the dashboard."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    for name in ("width_profile.png", "progress.png", "front.png"):
        if (run_dir / name).is_file():
            upload_artifact(artifact_store=artifact_store(run_dir), file_path=str(run_dir / name),
                            study_or_trial=study, storage=study._storage, mimetype="image/png")
    for rank, frozen in enumerate(trials, 1):
        subnet = _subnet(frozen, dims)
        save_note(optuna.trial.Trial(study, frozen._trial_id),
                  f"**#{rank}** of this search. Attention kept {subnet.attention_ratio():.1%}, "
                  f"MLP kept {subnet.mlp_ratio():.1%}; block ratio {subnet.ratio():.4f}, "
                  f"total params {subnet.total_params():,}.")


def finalize(study: optuna.Study, config, run_dir: Path, space, *, search_seconds: float) -> dict:
    from evaluators.data import dataset_windows
    from evaluators.perplexity import perplexity
    from reform.rectify import ReformSpec, rectify
    from search.job import build_fitness, load_prepared, release_fitness
    from space.export import export_subnet
    from space.models import load_model

    started = time.time()
    multi = len(study.directions) > 1
    dims = space.dims
    if multi:
        front = front_trials(study)
        # Export the front's member nearest the top of the range; the front itself is reported.
        candidates = sorted(front, key=lambda t: (abs(t.values[1] - config.ratio), t.values[0]))[:1]
    else:
        front = []
        candidates = top_trials(study, config.final_top_k)

    # 1. re-score the best on a larger calibration slice
    fitness = build_fitness(config, run_dir, windows="final_windows")
    rescored = []
    for t in candidates:
        value = fitness.evaluate(_subnet(t, dims)).ppl
        rescored.append({"trial": t.number, "search_value": t.values[0], "rescored": value})
        log.info("trial %d: search %.3f, re-scored %.3f", t.number, t.values[0], value)
    del fitness
    release_fitness()
    gc.collect()
    rescore_seconds = time.time() - started
    winner = min(rescored, key=lambda r: r["rescored"])
    chosen = next(t for t in candidates if t.number == winner["trial"])
    subnet = _subnet(chosen, dims)

    # 2. rectify and export the winner (float32, from the dense model)
    t0 = time.time()
    loaded, adapter, orders, _ = load_prepared(config, run_dir)
    spec = ReformSpec("lstsq", config.export_reform, damping=config.damping)
    overrides = rectify(adapter, subnet, config.calibration_spec().windows(loaded.tokenizer), spec=spec)
    export_dir = run_dir / "export"
    record = {
        "source": loaded.source.to_dict(),
        "target_ratio": config.ratio,
        "block_ratio": subnet.ratio(),
        "total_ratio": subnet.total_ratio(),
        "recipe": {"method": "search", "searcher": config.searcher, "importance": config.importance,
                   "preset": config.preset, "trial": chosen.number, "compensation": spec.to_dict(),
                   "calibration": config.calibration, "fitness_windows": config.fitness_windows,
                   "fitness_reform": config.fitness_reform},
        "environment": environment(),
    }
    export_subnet(adapter, subnet, orders, export_dir, tokenizer=loaded.tokenizer, metadata=record,
                  overrides=overrides)
    del loaded, adapter, overrides
    gc.collect()
    export_seconds = time.time() - t0

    # 3. test perplexity of the export, loaded back from disk
    t0 = time.time()
    test = None
    if config.eval_windows != 0:
        exported = load_model(str(export_dir), dtype=torch.float32, device=config.device)
        windows = dataset_windows(exported.tokenizer, "wikitext2", seqlen=2048, limit=config.eval_windows)
        test = {"dataset": "wikitext2", "split": "test", "seqlen": 2048, "windows": int(windows.shape[0]),
                "dtype": "float32", "ppl": perplexity(exported.model, windows)}
        del exported
    test_seconds = time.time() - t0

    summary = {
        "run_dir": str(run_dir),
        "config": study.user_attrs.get("config"),
        "completed_trials": len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])),
        "best": {"trial": chosen.number, "search_value": chosen.values[0], "rescored": winner["rescored"],
                 "widths": chosen.user_attrs["widths"], "block_ratio": subnet.ratio(),
                 "total_ratio": subnet.total_ratio(), "attention_ratio": subnet.attention_ratio(),
                 "mlp_ratio": subnet.mlp_ratio(), "total_params": subnet.total_params()},
        "rescored": rescored,
        "front": [{"trial": t.number, "ppl": t.values[0], "ratio": t.values[1]} for t in front],
        "export": str(export_dir),
        "export_reform": spec.to_dict(),
        "test": test,
        "seconds": {"search": search_seconds, "rescore": rescore_seconds, "export": export_seconds,
                    "test": test_seconds},
        "environment": environment(),
    }
    if test is not None:
        from space.export import update_subnet_record

        update_subnet_record(export_dir, metrics={"wikitext2_test": test})
    write_json(run_dir / "best.json", summary)
    report.width_profile(subnet, run_dir / "width_profile.png", title=f"chosen subnet (trial {chosen.number})")
    if multi:
        report.front_plot(study, run_dir / "front.png")
    else:
        report.progress_plot(study, run_dir / "progress.png")
    attach_summary(study, run_dir, front if multi else top_trials(study, min(3, config.final_top_k)), dims)
    report.markdown_report(summary, run_dir / "report.md")
    log.info("best subnet: trial %d, re-scored %.3f; export in %s", chosen.number, winner["rescored"], export_dir)
    return summary
