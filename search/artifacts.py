"""Pictures and notes attached to a study, where the Optuna dashboard shows them: each new best
trial's width profile while the search runs, and the run's pictures and a note on each of the best
trials at the end (notes need the optional ``optuna-dashboard`` package)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import optuna

from search import report
from space.subnet import LayerWidths, Subnet

log = logging.getLogger(__name__)

ARTIFACTS = "artifacts"


def trial_subnet_of(trial: optuna.trial.FrozenTrial, dims) -> Subnet:
    """The subnet a finished trial evaluated (its ``widths`` user attribute)."""
    return Subnet(dims, [LayerWidths(*w) for w in trial.user_attrs["widths"]])


def artifact_store(run_dir: Path):
    from optuna.artifacts import FileSystemArtifactStore

    (run_dir / ARTIFACTS).mkdir(exist_ok=True)
    return FileSystemArtifactStore(str(run_dir / ARTIFACTS))


def attach_profile(study: optuna.Study, trial, subnet: Subnet, run_dir: Path) -> None:
    """A width-profile picture on a running trial (finished trials cannot take artifacts). A picture
    is not worth the trial: a failure to write it (a full disk...) is logged, and the trial goes on."""
    from optuna.artifacts import upload_artifact

    png = run_dir / f".profile-{trial.number}.png"
    try:
        report.width_profile(subnet, png, title=f"trial {trial.number}: block ratio {subnet.ratio():.3f}")
        upload_artifact(artifact_store=artifact_store(run_dir), file_path=str(png), study_or_trial=trial,
                        storage=study._storage, mimetype="image/png")
    except OSError as exc:
        log.warning("trial %d: width profile not attached (%s)", trial.number, exc)
    finally:
        png.unlink(missing_ok=True)


def attach_summary(study: optuna.Study, run_dir: Path, trials, dims) -> None:
    """The run's pictures on the study, and a note on each of the best trials, for the dashboard."""
    from optuna.artifacts import upload_artifact

    for name in ("width_profile.png", "progress.png", "front.png"):
        if (run_dir / name).is_file():
            upload_artifact(artifact_store=artifact_store(run_dir), file_path=str(run_dir / name),
                            study_or_trial=study, storage=study._storage, mimetype="image/png")
    if importlib.util.find_spec("optuna_dashboard") is None:
        log.info("no notes on the best trials: they need optuna-dashboard (pip install 'llm-pruner[dashboard]')")
        return
    from optuna_dashboard import save_note

    for rank, frozen in enumerate(trials, 1):
        subnet = trial_subnet_of(frozen, dims)
        save_note(optuna.trial.Trial(study, frozen._trial_id),
                  f"**#{rank}** of this search. Attention kept {subnet.attention_ratio():.1%}, "
                  f"MLP kept {subnet.mlp_ratio():.1%}; block ratio {subnet.ratio():.4f}, "
                  f"total params {subnet.total_params():,}.")
