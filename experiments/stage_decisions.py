"""Would fewer windows in the staged evolution's last stage have made the same decisions?

Each generation of ``--evolution staged`` ends with its best challenger and the incumbent scored on the
same fresh windows of the last stage (16 by default, half of a generation's 64 window evaluations); the
lower value becomes the incumbent. A run's history (``study.user_attrs["staged"]["history"]``) keeps both
candidates' running values after each batch of windows (since c56a360). This script reads them and says,
for every prefix of batches, in how many generations the decision on those windows alone equals the
decision on all of them, and how far apart the two values were where they disagree. A cheaper generation
(fewer last-stage windows, more generations in the same time) is safe where the decisions agree. It also
reads off a sequential last stage: stop after the first batch where the two are far apart.

Reads only the run's journal (no model).

    python experiments/stage_decisions.py runs/quality/0.7/long-seed0 [more runs] --out experiments/results/stage_decisions.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.cli.common import exit_status
from search.rundir import JOURNAL, load_run_study
from search.stages import STATE
from space.errors import UserError
from space.export import write_json

RESULTS = Path(__file__).parent / "results"
EARLY_STOP_GAPS = [0.002, 0.003, 0.005, 0.01]  # relative gaps after the first batch (a sequential last stage)


def decisions(history: list[dict]) -> list[dict]:
    """Per generation with an incumbent and per-batch values: the running values of the challenger and
    the incumbent, and whether the challenger won after each prefix of batches (the last: the decision)."""
    out = []
    for entry in history:
        batches = entry.get("batches") or {}
        challenger, incumbent = batches.get("challenger", []), batches.get("incumbent", [])
        if not challenger or len(challenger) != len(incumbent):
            continue  # generation 0 (no incumbent), a failed candidate, or a run older than the record
        out.append({"generation": entry["generation"], "challenger": challenger, "incumbent": incumbent,
                    "won": [c < i for c, i in zip(challenger, incumbent)]})
    return out


def agreement(rows: list[dict]) -> list[dict]:
    """For each prefix of batches: in how many generations its decision is the whole stage's, and the
    largest relative gap between the two candidates where it is not."""
    if not rows:
        return []
    batches = min(len(r["won"]) for r in rows)
    out = []
    for prefix in range(1, batches + 1):
        differ = [r for r in rows if r["won"][prefix - 1] != r["won"][-1]]
        gaps = [abs(r["challenger"][-1] - r["incumbent"][-1]) / r["incumbent"][-1] for r in differ]
        out.append({"batches": prefix, "generations": len(rows), "same": len(rows) - len(differ),
                    "replacements_on_all": sum(r["won"][-1] for r in rows),
                    "largest_gap_where_different": max(gaps, default=0.0)})
    return out


def early_stops(rows: list[dict], thresholds: list[float]) -> list[dict]:
    """A sequential last stage read off the record: per relative gap threshold, in how many generations
    the first batch's gap exceeds it (the stage would stop there) and how many of those the whole stage
    decides the other way."""
    out = []
    for threshold in thresholds:
        stopped = [r for r in rows if abs(r["challenger"][0] - r["incumbent"][0]) / r["incumbent"][0] > threshold]
        out.append({"threshold": threshold, "generations": len(rows), "stopped": len(stopped),
                    "changed": sum(r["won"][0] != r["won"][-1] for r in stopped)})
    return out


def alone(running: list[float]) -> list[float]:
    """Each batch's own value from running means over batches of equal size (equal windows, equal
    positions: the mean of batch k is k * running[k] - (k - 1) * running[k - 1])."""
    return [(k + 1) * v - k * running[k - 1] if k else v for k, v in enumerate(running)]


def halves(rows: list[dict]) -> dict:
    """Whether the first and the last batch, each alone (disjoint windows), decide alike: the decision's
    own noise, which the prefix agreement understates (a prefix is part of the whole)."""
    rows = [r for r in rows if len(r["won"]) >= 2]
    same = 0
    for r in rows:
        challenger, incumbent = alone(r["challenger"]), alone(r["incumbent"])
        same += (challenger[0] < incumbent[0]) == (challenger[-1] < incumbent[-1])
    return {"generations": len(rows), "same": same}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="staged search run folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "stage_decisions.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [run for run in args.runs if not (run / JOURNAL).is_file()]
    if missing:
        raise UserError(f"{missing[0]} is not a search run folder (no {JOURNAL})")
    data = {"command": "python experiments/stage_decisions.py " + " ".join(sys.argv[1:]), "runs": {}}
    for run in args.runs:
        history = load_run_study(run).user_attrs.get(STATE, {}).get("history", [])
        rows = decisions(history)
        data["runs"][str(run)] = {"decisions": rows, "agreement": agreement(rows), "halves": halves(rows),
                                  "early_stops": early_stops(rows, EARLY_STOP_GAPS)}
        for a in data["runs"][str(run)]["agreement"]:
            print(f"{run}: first {a['batches']} batch(es): the same decision in {a['same']} of {a['generations']} "
                  f"generations ({a['replacements_on_all']} replacements on all); largest gap where different "
                  f"{100 * a['largest_gap_where_different']:.3f} %")
        split = data["runs"][str(run)]["halves"]
        print(f"{run}: the first and the last batch alone decide alike in {split['same']} of {split['generations']}")
        for stop in data["runs"][str(run)]["early_stops"]:
            print(f"{run}: stopping after the first batch where its gap exceeds {100 * stop['threshold']:.1f} %: "
                  f"{stop['stopped']} of {stop['generations']} generations, {stop['changed']} decided otherwise by all")
    write_json(args.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
