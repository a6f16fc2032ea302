"""Does a search's last step pick its best model? Every finalist exported, side by side.

A search ends by re-scoring its finalists (``final_top_k`` of them; the staged preset's incumbents) with
its own fitness on the re-scoring region of the calibration text, and exports the lowest. The fitness
refits the kept units' outputs by local least squares on the dense model's statistics, keeping the unit
order's prefix; the export refits them on the pruned upstream model's statistics, on its own text
(WikiText-2 + c4:calib above ratio 0.6) and, by default above 0.6, with the units chosen again. This
script exports every finalist of a finished run as the search would have exported it (``llm-pruner
export RUN --trial N``: the run's own export for its winner) and measures each in float32 on:

- held-out validation text, where a choice may be made: the KL to the dense model (top-K, as the
  search's fitness) and the perplexity on the run's own re-scoring windows, and PTB validation;
- the protocol's test texts (the run's ``eval_datasets``, first ``--test-windows`` windows of 2048),
  reported only.

It answers whether re-scoring the finalists *as exported* would choose a better model than the fitness
does. Resumable: finalists already in the JSON are kept.

    LLM_PRUNER_DATA=../shared/data python experiments/finalists.py --config experiments/configs/finalists/finalists.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from evaluators.data import dataset_windows
from evaluators.divergence import batch_kl, reference
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from experiments.outputs import command_line  # noqa: E402
from experiments.fitness_rank import spearman
from search.artifacts import trial_subnet_of
from search.cli.common import exit_status, parse_args_with_config
from search.config import SearchConfig
from search.finalize import export_perplexity, export_winner
from search.plan import config_dims, model_config
from search.rundir import BEST, EXPORT, load_run_config, load_run_study
from space.errors import UserError
from space.export import write_json
from space.models import load_model

RESULTS = Path(__file__).parent / "results"
EXPORTS = Path("runs/finalists")  # the finalists' exports (ignored by git; the run's winner stays in its folder)
KL_BATCH = 8


def kl_to_reference(model, windows: torch.Tensor, ref) -> float:
    """Mean KL_K(dense ‖ model) per position over ``windows`` (``ref`` made on them, batched alike)."""
    total, count = 0.0, 0
    for i, first in enumerate(range(0, windows.shape[0], ref.batch_size)):
        kl, n = batch_kl(model, windows[first : first + ref.batch_size], ref.log_probs[i], ref.ids[i], ref.log_rest[i])
        total, count = total + kl, count + n
    return total / count


def finalist_export(run_dir: Path, config: SearchConfig, best: dict, trial, dims) -> Path:
    """The finalist's export folder: the run's own export for its winner, else one made here as
    ``llm-pruner export`` makes it (kept, so that a re-run only measures)."""
    if trial.number == best["best"]["trial"]:
        return run_dir / EXPORT
    out = EXPORTS / f"{run_dir.parent.name}-{run_dir.name}" / f"trial-{trial.number}"
    if not (out / "subnet.json").is_file():
        export_winner(trial_subnet_of(trial, dims), trial.number, config, run_dir, out_dir=out)
    recorded = json.loads((out / "subnet.json").read_text())["recipe"]["trial"]
    if recorded != trial.number:
        raise UserError(f"{out} holds trial {recorded}, not {trial.number}: move it away and run again")
    return out


def measure_run(run_dir: Path, args, done: list[dict], save) -> list[dict]:
    config = load_run_config(run_dir, eval_windows=args.test_windows)
    best = json.loads((run_dir / BEST).read_text())
    dims = config_dims(model_config(config.model))
    trials = {t.number: t for t in load_run_study(run_dir).get_trials(deepcopy=False)}
    dense = load_model(config.model, dtype=torch.float32)
    rescoring = config.calibration_spec("final_windows").windows(dense.tokenizer)
    ptb_validation = dataset_windows(dense.tokenizer, "ptb", split="validation", seqlen=2048, limit=args.ptb_windows)
    ref = reference(dense.model, rescoring, top_k=config.fitness_top_k, batch_size=KL_BATCH)
    del dense
    rows = list(done)
    for finalist in best["rescored"]:
        if any(r["trial"] == finalist["trial"] for r in rows):
            continue
        started = time.time()
        export_dir = finalist_export(run_dir, config, best, trials[finalist["trial"]], dims)
        exported = load_model(str(export_dir), dtype=torch.float32)
        row = {**finalist, "chosen_by_search": finalist["trial"] == best["best"]["trial"], "export": str(export_dir),
               "exported_kl": kl_to_reference(exported.model, rescoring, ref),
               "rescoring_ppl": perplexity(exported.model, rescoring),
               "ptb_validation": perplexity(exported.model, ptb_validation)}
        del exported
        row["test"] = {spec: r["ppl"] for spec, r in export_perplexity(config, export_dir).items()}
        row["seconds"] = round(time.time() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows)
    return rows


def report(data: dict) -> str:
    lines = ["# A search's finalists, each exported: would re-scoring them as exported choose better?", "",
             f"Command: `LLM_PRUNER_DATA=../shared/data {data['command']}`", "",
             ("Each finalist of the run (the trials its last step re-scores) exported as the search exports its winner "
             "(`llm-pruner export RUN --trial N`; the winner's is the run's own export), measured in float32. "
             "`re-scored`: the search's fitness on its re-scoring windows (what chose the winner); `exported KL`: "
             "the export's top-K KL to the dense model on the same windows; `re-scoring ppl`: its perplexity there; "
             f"PTB validation: the first {data['ptb_windows']} windows of 2048. Test texts (first "
             f"{data['test_windows']} windows of 2048) are reported, never chosen on. `*`: the search's choice."), ""]
    for run, rows in data["runs"].items():
        tests = list(rows[0]["test"]) if rows else []
        lines += [f"## {run}", "", "| trial | re-scored | exported KL | re-scoring ppl | PTB validation | "
                  + " | ".join(f"{t} test" for t in tests) + " |", "|---|---|---|---|---|" + "---|" * len(tests)]
        for r in sorted(rows, key=lambda r: r["rescored"]):
            lines.append(f"| {r['trial']}{' *' if r['chosen_by_search'] else ''} | {r['rescored']:.4f} | "
                         f"{r['exported_kl']:.4f} | {r['rescoring_ppl']:.3f} | {r['ptb_validation']:.3f} | "
                         + " | ".join(f"{r['test'][t]:.3f}" for t in tests) + " |")
        if len(rows) > 2:
            lines += ["", "Spearman's rank correlation over the finalists:", "",
                      "| | " + " | ".join(["exported KL", "PTB validation", *(f"{t} test" for t in tests)]) + " |",
                      "|---|" + "---|" * (2 + len(tests))]
            for name, key in (("re-scored", "rescored"), ("exported KL", "exported_kl"),
                              ("PTB validation", "ptb_validation")):
                values = [r[key] for r in rows]
                cells = [spearman(values, [r[k] for r in rows]) for k in ("exported_kl", "ptb_validation")]
                cells += [spearman(values, [r["test"][t] for r in rows]) for t in tests]
                lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        lines.append("")
    machine = data["environment"]["machine"]
    lines += [f"Machine: {machine['cpu']}, {machine['threads']} threads."]
    notes = Path(data["out"]).with_suffix(".notes.md")
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", default=[], help="finished search run folders")
    parser.add_argument("--ptb-windows", type=int, default=16)
    parser.add_argument("--test-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "finalists.json")
    parser.add_argument("--report", action="store_true", help="only write the Markdown of --out's JSON")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    settings = {"ptb_windows": args.ptb_windows, "test_windows": args.test_windows}
    unfinished = [run for run in args.runs if not (run / BEST).is_file()]
    if unfinished or not (args.runs or data["runs"]):
        print(f"{unfinished[0]} is not a finished search run folder (no {BEST})" if unfinished else
              "give the run folders to measure (or --report with an --out that holds some)", file=sys.stderr)
        return 2
    if not args.report:
        if data["runs"] and any(data.get(k) != v for k, v in settings.items()):
            print(f"{args.out} was measured with other settings; use another --out", file=sys.stderr)
            return 2
        data.update(settings, out=str(args.out))
        for run_dir in args.runs:
            def save(rows, run=str(run_dir)):
                data["runs"][run] = rows
                write_json(args.out, {**data, "command": command, "environment": environment()})

            measure_run(run_dir, args, data["runs"].get(str(run_dir), []), save)
    text = report(data)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
