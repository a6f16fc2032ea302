"""Compare two runs of the same commands on two versions of the code (issue 11's "same numbers").

Reads, for each of two output folders made by the commands below, the demo search's study (every
trial's widths and calibration perplexity), its best.json (winner, re-scored value, test
perplexity) and the FLAP export's subnet.json (widths, kept units, test perplexity), and reports
where they differ. The commands, run once per version of the code in one sitting on one machine
(LLM_PRUNER_CACHE pointing at a fresh folder per run, so nothing is reused across versions):

    llm-pruner search --model smollm2-135m --ratio 0.7 --searcher evolution --evolution tiny \\
        --trials 24 --nsamples 32 --eval-windows 4 --run-dir OUT/demo-0.7          # = make demo
    llm-pruner -q prune --model smollm2-135m --ratio 0.7 --method flap --out OUT/flap-0.7 \\
        --eval wikitext2 --limit-windows 32

Usage: python experiments/same_numbers.py BEFORE_OUT AFTER_OUT [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from search.cli.common import parse_args_with_config
from search.rundir import load_run_study
from space.export import write_json


def study_trials(run_dir: Path) -> list[dict]:
    study = load_run_study(run_dir)
    return [{"number": t.number, "state": t.state.name, "value": t.value, "widths": t.user_attrs.get("widths")}
            for t in study.trials]


def summary(out: Path) -> dict:
    best = json.loads((out / "demo-0.7" / "best.json").read_text())
    flap = json.loads((out / "flap-0.7" / "subnet.json").read_text())
    demo_export = json.loads((out / "demo-0.7" / "export" / "subnet.json").read_text())
    return {
        "demo_trials": study_trials(out / "demo-0.7"),
        "demo_best": {k: best["best"][k] for k in ("trial", "search_value", "rescored", "widths")},
        "demo_test_ppl": best["test"]["ppl"],
        "demo_kept": demo_export["kept"],
        "flap_widths": flap["subnet"]["layers"],
        "flap_kept": flap["kept"],
        "flap_test_ppl": flap["metrics"]["ppl"]["wikitext2"],
        "flap_windows": flap["metrics"]["windows"]["wikitext2"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--json", type=Path)
    return parse_args_with_config(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    a, b = summary(args.before), summary(args.after)
    rows = []
    for key in a:
        same = a[key] == b[key]
        if isinstance(a[key], float):
            shown = f"{a[key]:.4f} vs {b[key]:.4f}"
            same = f"{a[key]:.4f}" == f"{b[key]:.4f}"
        elif key == "demo_trials":
            shown = f"{len(a[key])} trials, values and widths {'identical' if same else 'DIFFERENT'}"
        else:
            shown = "identical" if same else "DIFFERENT"
        rows.append({"what": key, "same": same, "shown": shown})
    print("| what | before vs after | same |\n|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['shown']} | {'yes' if r['same'] else 'NO'} |")
    if args.json:
        write_json(args.json, {"rows": rows, "before": str(args.before), "after": str(args.after),
                               "demo_test_ppl": [a["demo_test_ppl"], b["demo_test_ppl"]],
                               "flap_test_ppl": [a["flap_test_ppl"], b["flap_test_ppl"]]})


if __name__ == "__main__":
    main()
