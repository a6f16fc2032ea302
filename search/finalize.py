"""The end of a search, in steps: re-score the best candidates on more calibration text, rectify
and export the winner, measure its test perplexity, and write ``best.json``, ``report.md`` and the
pictures (also attached to the study, where the Optuna dashboard shows them)."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import optuna
import torch

from evaluators.data import DATASETS, dataset_windows, parse_dataset
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from reform.rectify import rectify
from reform.spec import ReformSpec
from search import report
from search.artifacts import attach_summary, trial_subnet_of
from search.config import SearchConfig
from search.prepare import build_fitness, load_prepared, release_fitness, streamed_device
from search.rundir import BEST, EXPORT
from search.stages import incumbent_trials
from space.export import export_subnet, record_header, update_subnet_record, write_json
from space.models import load_model
from space.subnet import Subnet

log = logging.getLogger(__name__)

COMPLETE = [optuna.trial.TrialState.COMPLETE]


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best finished trials with distinct widths (single objective)."""
    trials = sorted(study.get_trials(deepcopy=False, states=COMPLETE), key=lambda t: t.value)
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


def candidates(study: optuna.Study, config: SearchConfig) -> tuple[list, list]:
    """The trials to re-score, and the NSGA-II front (empty for one objective): for a front, its
    member nearest the top of the range is exported and the front itself is reported."""
    if config.staged is not None:  # values of different generations are on different windows
        return incumbent_trials(study, config.final_top_k), []
    if not config.multi_objective:
        return top_trials(study, config.final_top_k), []
    front = front_trials(study)
    return sorted(front, key=lambda t: (abs(t.values[1] - config.ratio), t.values[0]))[:1], front


def rescore(trials, config: SearchConfig, run_dir: Path, dims) -> list[dict]:
    """Each candidate's fitness on the larger ``final_windows`` slice of calibration text."""
    fitness = build_fitness(config, run_dir, windows="final_windows")
    rescored = []
    for t in trials:
        value = fitness.evaluate(trial_subnet_of(t, dims)).value
        rescored.append({"trial": t.number, "search_value": t.values[0], "rescored": value})
        log.info("trial %d: search %.3f, re-scored %.3f", t.number, t.values[0], value)
    del fitness
    release_fitness()
    gc.collect()
    return rescored


def export_winner(subnet: Subnet, trial_number: int, config: SearchConfig, run_dir: Path,
                  out_dir: Path | None = None) -> ReformSpec:
    """Rectify the winner (float32, from the dense model, the same least squares as the fitness
    unless ``export_reform`` says otherwise) and export it to ``out_dir`` (``run_dir/export``).
    On a GPU the float32 model stays in host memory and each block is rectified on the GPU for
    its turn (a 70B model exports from one GPU, as it was prepared)."""
    loaded, adapter, orders, _, _ = load_prepared(config, run_dir, streamed=True)
    spec = config.export_spec()
    calibration = config.export_calibration_spec()
    overrides = rectify(adapter, subnet, calibration.windows(loaded.tokenizer), spec=spec,
                        execution_device=streamed_device(config), orders=orders)
    record = {
        **record_header(loaded.source, subnet, config.ratio),
        "recipe": {"method": "search", "searcher": config.searcher, "importance": config.importance,
                   "preset": config.preset, "trial": trial_number, "compensation": spec.to_dict(),
                   "calibration": config.calibration, "fitness_windows": config.fitness_windows,
                   "fitness_reform": config.fitness_reform, "export_calibration": calibration.to_dict()},
        "environment": environment(),
    }
    export_subnet(adapter, subnet, orders, out_dir or run_dir / EXPORT, tokenizer=loaded.tokenizer, metadata=record,
                  overrides=overrides)
    del loaded, adapter, overrides
    gc.collect()
    return spec


def export_perplexity(config: SearchConfig, export_dir: Path) -> dict[str, dict]:
    """Perplexity of the export, loaded back from disk (float32), on the first ``eval_windows``
    windows of 2048 of each of ``eval_datasets`` (their test or held-out split)."""
    if config.eval_windows == 0:
        return {}
    exported = load_model(str(export_dir), dtype=torch.float32, device=config.device)
    results = {}
    for spec in config.eval_datasets:
        name, split = parse_dataset(spec)
        split = split or DATASETS[name].eval_split
        windows = dataset_windows(exported.tokenizer, name, split=split, seqlen=2048, limit=config.eval_windows)
        results[spec] = {"dataset": name, "split": split, "seqlen": 2048, "windows": int(windows.shape[0]),
                         "dtype": "float32", "ppl": perplexity(exported.model, windows)}
    return results


def summarise(study, chosen, winner: dict, subnet: Subnet, rescored, front, *, run_dir: Path, spec: ReformSpec,
              tests: dict[str, dict], seconds: dict, unit_order: dict) -> dict:
    """What ``best.json`` holds: ``test`` is the WikiText-2 test perplexity (the headline number),
    ``held_out`` the others."""
    headline = next((spec for spec, t in tests.items() if t["dataset"] == "wikitext2"), None)
    return {
        "run_dir": str(run_dir),
        "config": study.user_attrs.get("config"),
        "completed_trials": len(study.get_trials(deepcopy=False, states=COMPLETE)),
        "best": {"trial": chosen.number, "search_value": chosen.values[0], "rescored": winner["rescored"],
                 "widths": chosen.user_attrs["widths"], "block_ratio": subnet.ratio(),
                 "total_ratio": subnet.total_ratio(), "attention_ratio": subnet.attention_ratio(),
                 "mlp_ratio": subnet.mlp_ratio(), "total_params": subnet.total_params()},
        "rescored": rescored,
        "front": [{"trial": t.number, "search_value": t.values[0], "ratio": t.values[1]} for t in front],
        "export": str(run_dir / EXPORT),
        "export_reform": spec.to_dict(),
        "test": tests.get(headline),
        "held_out": {spec: t for spec, t in tests.items() if spec != headline},
        "seconds": seconds,
        # the order's own seconds, and whether ``prepare`` read it from the score cache rather than computed it
        "unit_order": unit_order,
        "environment": environment(),
    }


def write_outputs(study, summary: dict, subnet: Subnet, config: SearchConfig, run_dir: Path, dims) -> None:
    """``best.json``, the pictures, the dashboard's attachments and ``report.md``."""
    if summary["test"] is not None:
        held_out = {f"{spec.replace(':', '_')}": t for spec, t in summary["held_out"].items()}
        update_subnet_record(run_dir / EXPORT, metrics={"wikitext2_test": summary["test"], **held_out})
    write_json(run_dir / BEST, summary)
    report.width_profile(subnet, run_dir / "width_profile.png", title=f"chosen subnet (trial {summary['best']['trial']})")
    if config.multi_objective:
        report.front_plot(study, run_dir / "front.png")
        shown = front_trials(study)
    else:
        report.progress_plot(study, run_dir / "progress.png")
        shown = top_trials(study, min(3, config.final_top_k))
    attach_summary(study, run_dir, shown, dims)
    report.markdown_report(summary, run_dir / "report.md")


def finalize(study: optuna.Study, config: SearchConfig, run_dir: Path, dims, *, seconds: dict,
             unit_order: dict) -> dict:
    """Every step of the end of a search; returns the summary written to ``best.json`` (``seconds``: those
    before the end, ``prepare`` and ``search``; the end's own are added; ``unit_order``: the preparation's
    record of the order, :class:`search.prepare.Prepared`)."""
    started = time.time()
    trials, front = candidates(study, config)
    rescored = rescore(trials, config, run_dir, dims)
    rescore_seconds = time.time() - started
    winner = min(rescored, key=lambda r: r["rescored"])
    chosen = next(t for t in trials if t.number == winner["trial"])
    subnet = trial_subnet_of(chosen, dims)
    t0 = time.time()
    spec = export_winner(subnet, chosen.number, config, run_dir)
    export_seconds, t0 = time.time() - t0, time.time()
    tests = export_perplexity(config, run_dir / EXPORT)
    seconds = {**seconds, "rescore": rescore_seconds, "export": export_seconds, "test": time.time() - t0}
    summary = summarise(study, chosen, winner, subnet, rescored, front, run_dir=run_dir, spec=spec, tests=tests,
                        seconds=seconds, unit_order=unit_order)
    write_outputs(study, summary, subnet, config, run_dir, dims)
    log.info("best subnet: trial %d, re-scored %.3f; export in %s", chosen.number, winner["rescored"], run_dir / EXPORT)
    return summary
