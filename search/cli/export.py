"""``llm-pruner export``: any trial of a search (finished or still running) as a model, rectified and
exported as the search exports its winner."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from search.artifacts import trial_subnet_of
from search.config import SearchConfig
from search.finalize import export_perplexity, export_winner, front_trials
from search.plan import config_dims, model_config
from search.rundir import CONFIG, load_run_config, load_run_study
from space.errors import UserError
from space.export import check_destination


def add(sub) -> None:
    p = sub.add_parser("export", help="export any trial of a search (or the nsga2 front member nearest a ratio)")
    p.add_argument("run_dir", type=Path, help="the search's run folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="the trial's number (a finished one)")
    which.add_argument("--ratio", type=float, help="nsga2: the member of the front nearest this block ratio")
    p.add_argument("--out", required=True, type=Path, help="the export folder")
    p.add_argument("--storage", help="the search's --storage, if it used one")
    p.add_argument("--eval-windows", type=int, default=0, help="also measure its perplexity on this many windows "
                                                               "of 2048 of the search's --eval-datasets")
    p.set_defaults(validate=validate, main=main)


def validate(args) -> None:
    if not (args.run_dir / CONFIG).is_file():
        raise UserError(f"{args.run_dir} is not a search run folder (no {CONFIG})")
    if args.eval_windows < 0:
        raise UserError("--eval-windows must be 0 (no test) or more")
    check_destination(args.out)
    args.config = load_run_config(args.run_dir, eval_windows=args.eval_windows)
    study = load_run_study(args.run_dir, args.storage)
    args.chosen = chosen_trial(study, args.config, trial=args.trial, ratio=args.ratio)


def chosen_trial(study: optuna.Study, config: SearchConfig, *, trial: int | None, ratio: float | None):
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])}
    if trial is not None:
        if trial not in complete:
            raise UserError(f"trial {trial} is not a finished trial of this search ({len(complete)} are)")
        return complete[trial]
    if not config.multi_objective:
        raise UserError("--ratio picks a member of an nsga2 front; this search has one ratio: use --trial")
    return min(front_trials(study), key=lambda t: abs(t.values[1] - ratio))


def main(args) -> int:
    dims = config_dims(model_config(args.config.model))
    subnet = trial_subnet_of(args.chosen, dims)
    export_winner(subnet, args.chosen.number, args.config, args.run_dir, out_dir=args.out)
    print(f"trial {args.chosen.number} (block ratio {subnet.ratio():.4f}) exported to {args.out}")
    if args.eval_windows:
        print(json.dumps({k: round(v["ppl"], 3) for k, v in export_perplexity(args.config, args.out).items()}))
    return 0
