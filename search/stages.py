"""The driver of staged evolution (:class:`search.samplers.staged.StagedEvolution`): one generation
at a time, each child a trial of the study.

A generation asks one trial per child, scores every child on the first stage's windows, the best
few on the next stage's fresh windows, and so on; at the last stage the incumbent is re-scored on
the same windows and stays unless the last survivor beats it. Each stage's value is the trial's
intermediate value of that step (journaled as it comes), the trial's value is its first-stage value
(the one every child of a generation has, on the same windows), and the generation ends by writing
the incumbent to the study (user attribute ``staged``): that write is the commit point. A job
killed mid-generation resumes at the generation after the last commit; the interrupted
generation's trials stay in the study as FAIL (or as COMPLETE trials of an uncommitted generation,
ignored), and it is scored again on the same windows.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import optuna

from search.artifacts import attach_profile
from search.config import SearchConfig
from search.loop import FailureBudget, describe_trial, fitness_error
from search.samplers.staged import StagedEvolution
from search.widths import WidthSpace
from space.errors import JobFailed
from space.subnet import LayerWidths, Subnet

log = logging.getLogger(__name__)

STATE = "staged"  # the study's user attribute: the incumbent after the last committed generation


def committed(study: optuna.Study) -> dict:
    """The staged state: last committed ``generation`` (-1: none), ``incumbent`` trial and widths, and
    ``history`` (per generation: the incumbent's trial and its last-stage value)."""
    return study.user_attrs.get(STATE) or {"generation": -1, "incumbent": None, "widths": None, "history": []}


def incumbent_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The last ``k`` distinct incumbents, the latest first (what the end of the search re-scores)."""
    numbers = []
    for entry in reversed(committed(study)["history"]):
        if entry["trial"] not in numbers:
            numbers.append(entry["trial"])
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[n] for n in numbers[:k]]


def evaluate_all(pool, subnets: list[Subnet], rows: list[int], budget: FailureBudget) -> tuple[list[float], list, list]:
    """Fitness of every subnet on the windows ``rows``, each one's error (None if it worked) and its
    running value after each batch of windows; a failed evaluation scores infinity and counts against
    ``budget``."""
    values: list[float] = [math.inf] * len(subnets)
    batches: list[list[float]] = [[] for _ in subnets]
    errors: list[str | None] = [None] * len(subnets)
    queue = list(range(len(subnets)))
    pending = 0
    while queue or pending:
        while queue and pool.capacity > 0:
            i = queue.pop(0)
            pool.submit(i, {"subnet": subnets[i].to_dict(), "rows": rows})
            pending += 1
        for outcome in pool.wait():
            pending -= 1
            i = outcome.job_id
            if outcome.worker_died:
                queue.append(i)
                continue
            if outcome.error is not None:
                errors[i] = outcome.error
            else:
                errors[i] = fitness_error(outcome.result["value"])
                if errors[i] is None:
                    values[i] = outcome.result["value"]
                    batches[i] = outcome.result["batch_values"]
            if errors[i] is not None:
                log.error("a candidate's evaluation failed: %s", errors[i])
            budget.record(errors[i])
    return values, errors, batches


def run_staged(study: optuna.Study, config: SearchConfig, space: WidthSpace, pool, show_progress: bool,
               run_dir: Path) -> float:
    """Generations until about ``config.trials`` children are scored; returns the wall time."""
    from tqdm.auto import tqdm

    sampler: StagedEvolution = study.sampler
    started = time.time()
    state = committed(study)
    generations = sampler.generations(config.trials)
    pool_size = config.calibration_spec("fitness_windows").nsamples
    budget = FailureBudget(config.max_failures)
    bar = tqdm(total=generations, initial=min(state["generation"] + 1, generations), disable=not show_progress,
               desc="generations", unit="gen", dynamic_ncols=True)
    try:
        for generation in range(state["generation"] + 1, generations):
            incumbent = None if state["widths"] is None else _subnet(space, state["widths"])
            children = sampler.children(incumbent, generation, generations)
            rows = sampler.stage_rows(generation, pool_size)
            state = _generation(study, space, pool, children, incumbent, rows, generation, state, run_dir, budget)
            bar.update(1)
            bar.set_postfix(incumbent=f"{state['history'][-1]['value']:.3f}")
    finally:
        bar.close()
    return time.time() - started


def _subnet(space: WidthSpace, widths: list[list[int]]) -> Subnet:
    return Subnet(space.dims, [LayerWidths(*w) for w in widths])


def _generation(study, space: WidthSpace, pool, children: list[Subnet], incumbent: Subnet | None,
                rows: list[list[int]], generation: int, state: dict, run_dir: Path, budget: FailureBudget) -> dict:
    """Score one generation in stages, tell its trials and commit the new incumbent."""
    sampler: StagedEvolution = study.sampler
    children, trials = list(children), []

    def ask(child: Subnet) -> optuna.Trial:
        sampler.propose(space.encode(child))
        trial = study.ask(fixed_distributions=space.distributions())
        describe_trial(trial, child)
        trial.set_user_attr("generation", generation)
        trials.append(trial)
        return trial

    for child in children:
        ask(child)
    asked = len(trials)  # trials past these are combined children, asked on the last stage
    try:
        values, alive, incumbent_value, last_batches = _stages(pool, trials, children, incumbent, rows,
                                                               sampler.preset.survivors, budget,
                                                               combine=sampler.combined, ask=ask)
    except (KeyboardInterrupt, JobFailed):
        for trial in trials:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("interrupted in generation %d; re-run the same command to resume at it", generation)
        raise
    best = min(alive, key=lambda i: values[i][-1])
    replaced = incumbent is None or values[best][-1] < incumbent_value
    if replaced and math.isfinite(values[best][-1]):
        attach_profile(study, trials[best], children[best], run_dir)  # the dashboard shows each incumbent
    for i, trial in enumerate(trials):
        # a trial's value is its first stage's (every child's, on the same windows); a combined child is
        # scored on the last stage only, and that value is its own
        stage = len(rows) - 1 if i >= asked else 0
        trial.set_user_attr("stage_windows", [len(r) for r in rows[stage: len(values[i])]])
        finite = math.isfinite(values[i][stage])
        study.tell(trial, values[i][stage] if finite else None,
                   state=optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL)
    entry = {"generation": generation, "trial": trials[best].number if replaced else state["incumbent"],
             "value": values[best][-1] if replaced else incumbent_value, "challenger": values[best][-1],
             "windows": len(rows[-1]),
             # running values after each batch of the last stage: would fewer windows have decided the same?
             "batches": {"challenger": last_batches.get(best, []), "incumbent": last_batches.get("incumbent", [])}}
    chosen = children[best] if replaced else incumbent
    new_state = {"generation": generation, "incumbent": entry["trial"],
                 "widths": [[w.kv_heads, w.q_per_kv, w.channels] for w in chosen.layers],
                 "history": state["history"] + [entry]}
    study.set_user_attr(STATE, new_state)
    log.info("generation %d: incumbent trial %d, %.4f on %d windows (challenger %.4f)", generation,
             entry["trial"], entry["value"], entry["windows"], entry["challenger"])
    return new_state


def _stages(pool, trials, children: list[Subnet], incumbent: Subnet | None, rows: list[list[int]],
            survivors: tuple[int, ...], budget: FailureBudget, *, combine=None,
            ask=None) -> tuple[list[list[float]], list[int], float, dict]:
    """Every stage of a generation: per child its values by stage, the last stage's children, the
    incumbent's value on the last stage's windows (inf without one), and the last stage's running
    values per batch (by child index, and ``"incumbent"``). ``combine(incumbent, first, second)``: a child
    joining the two best of the stage before the last (or None), scored on the last stage beside its
    survivors; it is appended to ``children`` and its trial, from ``ask(child)``, to ``trials``."""
    values: list[list[float]] = [[] for _ in children]
    alive = list(range(len(children)))
    incumbent_value = math.inf
    for stage, stage_rows in enumerate(rows):
        last = stage == len(rows) - 1
        if stage > 0:
            ranked = sorted(alive, key=lambda i: values[i][-1])
            alive = ranked[: survivors[stage - 1]]
            pair = ranked[:2]
            if last and combine is not None and len(pair) == 2 and all(math.isfinite(values[i][-1]) for i in pair):
                joined = combine(incumbent, children[pair[0]], children[pair[1]])
                if joined is not None and joined != incumbent and joined not in children:
                    children.append(joined)
                    values.append([math.inf] * stage)  # not scored before the last stage
                    ask(joined).set_user_attr("combined_from", [trials[i].number for i in pair])
                    alive.append(len(children) - 1)
        jobs = [children[i] for i in alive] + ([incumbent] if last and incumbent is not None else [])
        scored, errors, batches = evaluate_all(pool, jobs, stage_rows, budget)
        for i, value, error in zip(alive, scored, errors):
            values[i].append(value)
            if error is None:
                trials[i].report(value, stage)
            else:
                trials[i].set_user_attr("error", error[:2000])
        if last:
            last_batches = dict(zip(alive, batches))
            if incumbent is not None:
                incumbent_value = scored[-1]
                last_batches["incumbent"] = batches[-1]
    return values, alive, incumbent_value, last_batches
