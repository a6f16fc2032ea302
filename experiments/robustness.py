"""Issue 12's measurement: a SmolLM2-135M search on 2 Ray workers that loses an actor and a trial
now and then ends exactly where an undisturbed one does.

Two searches with the same config and seed (the command line's defaults, no final step): (a)
undisturbed; (b) the first attempt of every ``--raise-every``-th trial raises in its worker and an
actor is killed (``ray.kill``; Ray restarts it) after every ``--kill-every``-th completed trial. Then,
from the two studies: ``--trials`` COMPLETE trials each, the same multiset of completed candidates
(none lost, none counted twice), the same best subnet, and (b)'s failures, re-queues and actor deaths.

    LLM_PRUNER_DATA=../shared/data nice -n 19 .venv/bin/python experiments/robustness.py --trials 60
    ... --trials 12 --kill-every 4 --raise-every 5 --evolution tiny --fitness-nsamples 2 --tag _small
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Ray workers import this module by name (experiments.robustness)
RESULTS = ROOT / "experiments" / "results"
log = logging.getLogger("robustness")

from evaluators.workers import RayPool  # noqa: E402
from search.cli.common import parse_args_with_config  # noqa: E402
from search.prepare import SearchEvaluator  # noqa: E402
from space.export import write_json  # noqa: E402

COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


class FaultyEvaluator:
    """The search's evaluator factory, whose first attempt of every ``every``-th trial raises (a
    marker file per trial in ``markers`` tells a retry from a first attempt, across processes)."""

    def __init__(self, config: dict, run_dir: str, *, every: int, markers: str):
        self.inner = SearchEvaluator(config, run_dir)
        self.every, self.markers = every, markers

    def __call__(self):
        evaluate = self.inner()

        def faulty(payload: dict) -> dict:
            trial = payload.get("trial")
            marker = Path(self.markers) / f"trial-{trial}"
            if trial is not None and (trial + 1) % self.every == 0 and not marker.exists():
                marker.touch()
                raise RuntimeError(f"injected fault in trial {trial}")
            return evaluate(payload)

        return faulty


class KillingPool(RayPool):
    """Ray actors, one of which is killed after every ``kill_every``-th completed job below
    ``stop_at``; the trial number travels in the payload (for :class:`FaultyEvaluator`)."""

    kill_every = 10
    stop_at = 60
    kills: list[dict] = []

    def __post_init__(self):
        super().__post_init__()
        self.completed = 0

    def submit(self, job_id: int, payload: dict, **options) -> None:
        super().submit(job_id, {**payload, "trial": job_id}, **options)

    def wait(self):
        import ray

        outcomes = super().wait()
        for outcome in outcomes:
            if outcome.result is None:
                continue
            self.completed += 1
            if self.completed % self.kill_every == 0 and self.completed < self.stop_at:
                # the actor killed least so far (Ray restarts each at most max_restarts times in all),
                # one in the middle of a job first (that job must go again)
                busy = {actor: job for actor, job, *_ in self._inflight.values()}
                killed = collections.Counter(k["actor"] for k in self.kills)
                actor = min(self.actors, key=lambda a: (killed[self.actors.index(a)], a not in busy))
                ray.kill(actor, no_restart=False)
                self.kills.append({"after_completed": self.completed, "actor": self.actors.index(actor),
                                   "holding_trial": busy.get(actor), "at": time.time()})
                log.warning("killed actor %(actor)d (holding trial %(holding_trial)s) after %(after_completed)d "
                            "completed jobs", self.kills[-1])
        return outcomes


def search_config(args):
    """The command line's config for these flags (its defaults for everything else)."""
    from search.cli.search import add, config_from

    parser = argparse.ArgumentParser()
    add(parser.add_subparsers())
    flags = ["search", "--model", args.model, "--ratio", str(args.ratio), "--run-dir", "unused",
             "--trials", str(args.trials), "--seed", str(args.seed)]
    flags += ["--evolution", args.evolution] if args.evolution else []
    flags += ["--fitness-nsamples", str(args.fitness_nsamples)] if args.fitness_nsamples else []
    return config_from(parser.parse_args(flags))


def run(args, config, run_dir: Path, disturbed: bool) -> dict:
    """One search in a fresh ``run_dir``; its wall time and (disturbed) the faults injected."""
    import search.job as job

    record = run_dir / "robustness-run.json"
    if not disturbed and args.keep_undisturbed and record.is_file():  # the same finished search, kept
        return json.loads(record.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    saved = job.SearchEvaluator, job.RayPool
    markers = tempfile.mkdtemp(prefix="robustness-markers-")
    if disturbed:
        job.SearchEvaluator = functools.partial(FaultyEvaluator, every=args.raise_every, markers=markers)
        KillingPool.kill_every, KillingPool.stop_at, KillingPool.kills = args.kill_every, args.trials, []
        job.RayPool = KillingPool
    started = time.time()
    try:
        result = job.run_search(config, run_dir, workers=args.workers, progress=False, final=False)
    finally:
        job.SearchEvaluator, job.RayPool = saved
    seconds = time.time() - started
    raised = sorted(int(p.name.split("-")[1]) for p in Path(markers).iterdir())
    shutil.rmtree(markers, ignore_errors=True)
    out = {"run_dir": str(run_dir), "seconds": seconds, "completed": result.completed,
           "raised_in_trials": raised if disturbed else [], "kills": KillingPool.kills if disturbed else []}
    write_json(record, out)
    return out


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def summary(run_dir: Path) -> dict:
    """What a study holds: completed candidates, failures, re-queues, the best, the log's worker deaths."""
    from search.rundir import load_run_study

    study = load_run_study(run_dir)
    done = study.get_trials(deepcopy=False, states=[COMPLETE])
    failed = study.get_trials(deepcopy=False, states=[FAIL])
    requeued = [t for t in study.trials if t.user_attrs.get("retry_of_failed") is not None]
    text = (run_dir / "search.log").read_text() if (run_dir / "search.log").is_file() else ""
    counts = collections.Counter(key(t.params) for t in done)
    ends, first_start = sorted(t.datetime_complete for t in done), min(t.datetime_start for t in study.trials if t.datetime_start)
    return {
        "first_result_after_s": (ends[0] - first_start).total_seconds(),
        "first_to_last_result_s": (ends[-1] - ends[0]).total_seconds(),
        "trials": len(study.trials), "complete": len(done), "failed": len(failed),
        "failed_trials": [{"number": t.number, "error": t.user_attrs.get("error")} for t in failed],
        "requeued": [{"number": t.number, "from": t.user_attrs["retry_of_failed"], "state": t.state.name}
                     for t in requeued],
        "duplicates": sum(n - 1 for n in counts.values()),
        "worker_deaths_logged": text.count("worker died during job"),
        "worker_unavailable_logged": text.count("worker unavailable during job"),
        "deadline_restarts_logged": text.count("deadline: its worker is restarted"),
        "best": {"number": study.best_trial.number, "value": study.best_value, "params": study.best_params,
                 "widths": study.best_trial.user_attrs.get("widths")},
        "completed": {key(t.params): t.value for t in done},
        # the completed candidates in the order they were drawn (a retry in its failed trial's place)
        "order": [key(t.params) for t in sorted(done, key=lambda t: t.user_attrs.get("retry_of_failed", t.number))],
        "counts": counts,
    }


def compare(a: dict, b: dict, trials: int) -> dict:
    same_values = [k for k in a["completed"] if k in b["completed"] and a["completed"][k] == b["completed"][k]]
    return {
        "both_complete_exactly": a["complete"] == trials and b["complete"] == trials,
        "same_completed_multiset": a["counts"] == b["counts"],
        "lost": sorted(set(a["counts"]) - set(b["counts"])),
        "extra": sorted(set(b["counts"]) - set(a["counts"])),
        "candidates_with_identical_values": len(same_values),
        "same_candidates_in_the_same_order": a["order"] == b["order"],
        "same_best": (a["best"]["params"], a["best"]["value"]) == (b["best"]["params"], b["best"]["value"]),
    }


def table(out: dict) -> str:
    a, b, c = out["undisturbed"], out["disturbed"], out["checks"]
    rows = [("wall time (s)", f"{out['runs']['undisturbed']['seconds']:.0f}", f"{out['runs']['disturbed']['seconds']:.0f}"),
            ("of which (s): first dispatch to first result (the actors load) / first to last result",
             *(f"{x['first_result_after_s']:.0f} / {x['first_to_last_result_s']:.0f}" for x in (a, b))),
            ("trials in the study", a["trials"], b["trials"]),
            ("COMPLETE trials", a["complete"], b["complete"]),
            ("FAIL trials (evaluation raised)", a["failed"], b["failed"]),
            ("failed candidates queued again (state of the retry)", "–",
             ", ".join(f"{r['from']}→{r['number']} {r['state']}" for r in b["requeued"]) or "none"),
            ("actors killed: after completed trial, actor (trial it held)", "–",
             ", ".join(f"{k['after_completed']}: {k['actor']} ({k['holding_trial']})"
                       for k in out["runs"]["disturbed"]["kills"]) or "none"),
            ("jobs sent again (log): worker died / unavailable (killed or restarting) / past the deadline",
             *(f"{x['worker_deaths_logged']} / {x['worker_unavailable_logged']} / {x['deadline_restarts_logged']}"
               for x in (a, b))),
            ("completed candidates counted twice", a["duplicates"], b["duplicates"]),
            ("best trial", a["best"]["number"], b["best"]["number"]),
            ("best fitness", f"{a['best']['value']:.6f}", f"{b['best']['value']:.6f}")]
    lines = ["| | (a) undisturbed | (b) disturbed |", "|---|---|---|"]
    lines += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {value if not isinstance(value, list) else len(value)} |" for name, value in c.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default in [("--model", str, "smollm2-135m"), ("--ratio", float, 0.5), ("--trials", int, 60),
                                ("--seed", int, 0), ("--workers", int, 2), ("--kill-every", int, 10),
                                ("--raise-every", int, 20)]:
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--evolution", help="evolution preset (default: the command line's, cpu)")
    p.add_argument("--fitness-nsamples", type=int, help="fitness windows (default: the command line's, 8)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "robustness")
    p.add_argument("--keep-undisturbed", action="store_true", help="reuse a finished undisturbed run of these settings")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished run folders")
    p.add_argument("--tag", default="", help="suffix of the result files (robustness<tag>.json/.md)")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. what else shared the machine)")
    return parse_args_with_config(p, argv)


def main() -> None:
    args = parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # search.log gets the loop's INFO lines, not stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from evaluators.environment import environment

    config = search_config(args)
    name = f"{config.evolution}-t{args.trials}-s{args.seed}"
    runs = {}
    for label, disturbed in [("undisturbed", False), ("disturbed", True)]:
        if args.report_only:  # the report again, from the two finished run folders
            runs[label] = json.loads((args.runs / f"{label}-{name}" / "robustness-run.json").read_text())
            continue
        print(f"running ({label}) ...", flush=True)
        runs[label] = run(args, config, args.runs / f"{label}-{name}", disturbed)
        print(f"  {runs[label]['seconds']:.0f} s", flush=True)
    a, b = summary(args.runs / f"undisturbed-{name}"), summary(args.runs / f"disturbed-{name}")
    finished = (args.runs / f"disturbed-{name}" / "robustness-run.json").stat().st_mtime
    out = {"command": command(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(finished)),
           "environment": environment(), "cpus": os.cpu_count(), "config": config.to_dict(), "args": vars(args) | {"runs": str(args.runs)},
           "runs": runs, "undisturbed": a, "disturbed": b, "checks": compare(a, b, args.trials), "note": args.note,
           "dirty": dirty()}
    print(table(out))
    write(out, args.tag)


def dirty() -> str:
    """A remark when the working tree differs from its commit (the measured code is not the commit's)."""
    import subprocess

    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return " with uncommitted changes" if status.stdout.strip() else ""


def command() -> str:
    """This measurement's command line (without the report's flags)."""
    argv = sys.argv[1:]
    words = [w for i, w in enumerate(argv) if w not in ("--note", "--report-only", "--keep-undisturbed")
             and (i == 0 or argv[i - 1] != "--note")]
    return " ".join([".venv/bin/python", "experiments/robustness.py", *words])


def write(out: dict, tag: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in out.items() if k not in ("undisturbed", "disturbed")}
    for label in ("undisturbed", "disturbed"):
        data[label] = {k: v for k, v in out[label].items() if k not in ("completed", "order", "counts")}
    write_json(RESULTS / f"robustness{tag}.json", data)
    (RESULTS / f"robustness{tag}.md").write_text(report(out))


def details(out: dict) -> str:
    """What the numbers of the table mean, from the data."""
    b, kills = out["disturbed"], out["runs"]["disturbed"]["kills"]
    lost = [k["holding_trial"] for k in kills if k["holding_trial"] is not None]
    same = out["checks"]["candidates_with_identical_values"]
    return (f"- Jobs in flight when their actor was killed: trials {', '.join(map(str, lost)) or 'none'}; each went "
            "again as the same trial and completed once (Ray reports such a job as *unavailable: the actor was "
            "restarted*, not as a dead worker). The other *unavailable* lines are jobs a restarting actor refused "
            "at once (it is down while it loads the model and builds the fitness); the pool rests it (backoff up "
            "to 30 s) and the job goes to the next free actor or again later: no candidate was lost or counted "
            "twice.\n"
            f"- {same} of the {out['args']['trials']} candidates have bit-identical fitness in both runs (one torch "
            "thread per actor); the disturbed study's best trial has another number only because the re-queued "
            "trials before it take numbers.\n"
            f"- The disturbed job took {out['runs']['disturbed']['seconds'] / out['runs']['undisturbed']['seconds']:.1f}x "
            "the undisturbed one's wall time: a killed actor's restart takes as long as its first start (about "
            f"{b['first_result_after_s'] / 60:.0f} min here, from the first dispatch to the first result), "
            "during which the other actor works alone, or none when both are restarting.")


def report(out: dict) -> str:
    """The Markdown report: what was measured and how, the table, and the verdict."""
    args, c, env = out["args"], out["checks"], out["environment"]
    fitness = out["config"]["fitness_windows"]
    ok = c["both_complete_exactly"] and c["same_completed_multiset"] and c["same_best"]
    verdict = ("**Pass**: both jobs finished with exactly {t} completed trials, the disturbed one's completed "
               "candidates are the undisturbed one's (none lost, none counted twice), and the best subnet is the "
               "same (widths and fitness).").format(t=args["trials"]) if ok else (
        "**Not the same**: " + "; ".join(k for k, v in c.items() if v is False) + " (see below).")
    return f"""# Robustness (issue 12): a disturbed SmolLM2 search ends where an undisturbed one does

Measured {out['date']} on {env['machine']['cpu']} ({out['cpus']} CPUs, no GPU), git {env.get('git_commit', '?')}{out.get('dirty', '')};
{', '.join(f'{k} {v}' for k, v in env['versions'].items() if k in ('torch', 'transformers', 'optuna', 'ray'))}.
{out['note']}

Command: `LLM_PRUNER_DATA=../shared/data nice -n 19 {out['command']}` (raw numbers in
`robustness{args['tag']}.json`; the two run folders under `{os.path.relpath(args['runs'], ROOT)}`).

Two searches of {args['model']} at ratio {args['ratio']} with the command line's defaults (searcher
{out['config']['searcher']}, evolution preset {out['config']['evolution']}, importance {out['config']['importance']},
fitness {out['config']['fitness']} on {fitness['nsamples']} x {fitness['seqlen']} tokens, {out['config']['dtype']}),
seed {args['seed']}, {args['trials']} trials, {args['workers']} Ray workers, without the final step (re-scoring,
export and test: the comparison is of the studies): (a) undisturbed; (b) the first attempt of every
{args['raise_every']}th trial (numbers {args['raise_every'] - 1}, {2 * args['raise_every'] - 1}, ...) raises in its worker, and one actor (the one
killed least so far, one holding a job first) is killed with `ray.kill(actor, no_restart=False)` after every
{args['kill_every']}th completed trial (Ray restarts it: it loads the model and builds the fitness again).

{verdict}

{table(out)}

{details(out)}

How the disturbed job keeps its place: a trial whose evaluation raises becomes FAIL (its error in
`user_attrs["error"]`) and its candidate is queued once more (`retry_of_failed`), in the failed trial's
generation; the evolution draws each child from a random stream indexed by the child's place among the
drawn ones (a queued trial shifts no later child); a job whose actor died goes again as the same trial; and
the loop does not open a generation while trials of the previous one still run, so parents never depend
on which worker finished first.
"""


if __name__ == "__main__":
    from experiments.robustness import main as main_of_the_module  # the classes Ray unpickles by this name
    main_of_the_module()
