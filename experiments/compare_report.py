"""``compare.md`` and ``compare.png`` from the JSON experiments/compare.py writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rows(results: dict) -> dict[str, dict[float, dict]]:
    rows: dict[str, dict[float, dict]] = {}
    for key, cell in results["cells"].items():
        if key == "dense":
            continue
        name, _, ratio = key.rpartition(":")
        rows.setdefault(name, {})[float(ratio)] = cell
    return rows


def _ppl(cell: dict | None, metric: str) -> float | None:
    if not cell or metric not in cell.get("metrics", {}):
        return None
    return cell["metrics"][metric]["ppl"]


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def write_report(results: dict, out: Path) -> None:
    config = results["config"]
    short = f"wikitext2_{config['short_seqlen']}"
    held_out = config.get("held_out", [])
    metrics = [("wikitext2_2048", "WikiText-2, 2048 tokens"), (short, f"WikiText-2, {config['short_seqlen']} tokens"),
               *((f"{name}_2048", f"{name}, 2048 tokens") for name in held_out)]
    rows = _rows(results)
    ratios = sorted({r for row in rows.values() for r in row} | set(results.get("ratios", [])), reverse=True)
    names = [name for name in rows if name != "search"]
    bases = list(dict.fromkeys(_base(name) for name in names))
    # a labelled variant (a --merge file's "osscar (search's calibration)") right under its recipe's row
    recipes = sorted(names, key=lambda name: bases.index(_base(name)))
    dense = results["cells"].get("dense")
    cap = ("each recipe's own calibration amount" if config["max_calib_tokens"] is None else
           f"each recipe's windows capped at {config['max_calib_tokens']} tokens")
    if results.get("merged"):
        cap += " (rows with a label in parentheses: see the note under the settings table)"
    lines = [
        "# Recipes and the 2025 anchors vs. the search, SmolLM2-135M",
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        f"WikiText-2 test perplexity, the first {_count(config['windows_2048'], 'window')} of 2048 tokens and the "
        f"same tokens in windows of {config['short_seqlen']}"
        + (f"; as many windows of 2048 of {', '.join(held_out)} (held out: no method calibrates on them)"
           if held_out else "")
        + f"; {config['dtype']} evaluation in process "
        f"(`subnet_view`, rectified in float32 then cast). Calibration: WikiText-2 validation; {cap}. "
        "ratio = kept fraction of block weights. "
        f"Dense: {_fmt(_ppl(dense, 'wikitext2_2048'))} (2048) / {_fmt(_ppl(dense, short))} "
        f"({config['short_seqlen']}). A – is a cell that has not run yet: re-running the command resumes, "
        "keeping every finished cell.",
        "",
    ]
    if any(name.startswith("tyr (") for name in rows):
        lines += ["Rows `tyr`: Týr's search (`llm-pruner search --method tyr`, experiments/quality.py's cells). `tyr` is "
                  "exported as first measured (least squares on 64 windows of 512 of WikiText-2, its unit order on "
                  "64); `tyr (search's calibration)` is the same search exported like the search row (256 windows, "
                  "with C4's calibration half above 0.6) and with its unit order on as many windows as the search "
                  "row's (256 where the search's osscar order takes them, 64 where its order is on its 64 statistics "
                  "windows): the same calibration text and token budget. `= search` marks the ratios where "
                  "the search's defaults are Týr's search: there that row is the search row itself.", ""]
    for metric, label in metrics:
        lines += [f"## Perplexity: {label}", "", "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for name in recipes + ["search"]:
            row = rows.get(name, {})
            cells = []
            for r in ratios:
                cell = row.get(r)
                if name == "search" and cell is None:
                    cells.append("pending")
                elif _is_search(cell):
                    cells.append("= search")
                elif cell is not None and "error" in cell:
                    cells.append("error")
                else:
                    cells.append(_fmt(_ppl(cell, metric)))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _zeroshot_table(rows, recipes, dense)
    lines += _seeds_table(rows, ratios, ["wikitext2", *held_out], short)
    lines += ["## Wall time of each recipe (seconds: scoring, selection, allocation, compensation; "
              "search: preparation (model, unit order, statistics), trial loop, rescoring of the finalists, rectified "
              "export; a recipe's scores read from the score cache counted with what they took to compute, a "
              "search's unit order so read given apart (+ cached order: its seconds when computed, on the machine "
              "of that run); "
              "≥ where its preparation was not recorded; not its test evaluation; in "
              "parentheses the bfloat16 matmul peak in TFLOP/s of the machine, measured in the cell's run, where "
              "recorded: the cells ran on machines up to twice apart)", "",
              "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for name in recipes + (["search"] if "search" in rows else []):
        row = rows[name]
        lines.append(f"| {name} | " + " | ".join(
            "= search" if _is_search(row.get(r)) else _wall(row[r]) if r in row else "–"
            for r in ratios) + " |")
    lines += ["", f"## Strongest recipe and the search, per ratio and text (2048 tokens; WikiText-2 also in "
                  f"windows of {config['short_seqlen']})", ""]
    for r in ratios:
        for metric in ["wikitext2_2048", short, *(f"{name}_2048" for name in held_out)]:
            # a row that is the search itself (the same search and export) is not a rival
            scored = [(v, n) for n in recipes if (v := _ppl(rows[n].get(r), metric)) is not None
                      and not _is_search(rows[n][r])]
            if not scored:
                continue
            best, name = min(scored)
            search = _ppl(rows.get("search", {}).get(r), metric)
            # digits enough to tell the two apart (a near tie reads 24.726 against 24.730, 0.02 %)
            digits = 2 if search is None or f"{search:.2f}" != f"{best:.2f}" else 3
            gap = 0.0 if search is None else abs(best - search) / best
            verdict = ("search pending" if search is None else
                       f"search {search:.{digits}f}, {gap:.{1 if gap >= 0.001 else 2}%} "
                       f"{'lower (better)' if search < best else 'higher (worse)'}")
            text = metric.removesuffix("_2048").replace("_", " in windows of ")
            lines.append(f"- {r:g}, {text}: {name} {best:.{digits}f}; {verdict}")
        scored = [(v, n) for n in recipes if (v := _zeroshot(rows[n].get(r))) is not None
                  and not _is_search(rows[n][r])]
        if scored:
            best, name = max(scored)
            search = _zeroshot(rows.get("search", {}).get(r))
            verdict = ("search pending" if search is None else
                       f"search {search:.3f}, {abs(search - best) * 100:.1f} points "
                       f"{'higher (better)' if search > best else 'lower (worse)' if search < best else 'tie'}")
            errors = [zeroshot_standard_error(rows[n].get(r)) for n in (name, "search") if n in rows]
            if search is not None and None not in errors:
                verdict += (f" (standard error of the difference {math.hypot(*errors) * 100:.1f} points: "
                            "binomial over each task's questions, unpaired)")
            lines.append(f"- {r:g}, zero-shot average: {name} {best:.3f}; {verdict}")
        lines += _seeds_verdict(rows, r, ["wikitext2", *held_out], short)
    lines += ["", "## Settings each recipe ran with", "",
              "| method | importance | allocation | compensation | calibration used | chosen by its selection step |",
              "|---|---|---|---|---|---|"]
    for name in recipes:
        done = [(r, c["record"]["recipe"]) for r, c in sorted(rows[name].items(), reverse=True)
                if "recipe" in c.get("record", {})]  # searches (tyr, evopress-depth) have their own records
        if not done:
            continue
        recipe = done[0][1]
        by_ratio = {r: _calibration(rec.get("calibration")) for r, rec in done}
        used = (by_ratio[done[0][0]] if len(set(by_ratio.values())) == 1 else
                "; ".join(f"{r:g}: {c}" for r, c in by_ratio.items()))
        chosen = "; ".join(f"{r:g}: {_chosen(rec)}" for r, rec in done if rec.get("selected")) or "–"
        lines.append(f"| {name} | {recipe['importance']} | {recipe['allocation']} | {recipe['compensation']} | "
                     f"{used} | {chosen} |")
    for extra in results.get("merged", []):
        limit = extra["config"].get("max_calib_tokens")
        amount = ("each recipe on the windows the search's export fits on at that ratio: the same text and token "
                  "budget" if extra["config"].get("calib_as_search") else
                  "each recipe's own calibration amount" if limit is None else f"calibration capped at {limit} tokens")
        lines += ["", f"Rows labelled *{extra['config'].get('label', '').strip()}* come from `{extra['file']}` "
                      f"({amount}): `{extra['command']}`"]
    errors = [f"- {k}: {c['error']}" for k, c in results["cells"].items() if "error" in c]
    if errors:
        lines += ["", "## Cells that failed", "", *errors]
    notes = out.with_name(out.name + ".notes.md")  # hand-written findings, kept across re-runs
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, recipes, dense, out.with_suffix(".png"))


def _is_search(cell: dict | None) -> bool:
    """Whether a row's cell is the search row's own (the same search and export: never its rival)."""
    return cell is not None and "same_as" in cell


def _wall(cell: dict) -> str:
    # a recipe's run records its machine's peak; a search row has its quality.py cell's
    seconds, peak = cell.get("recipe_seconds"), cell.get("bf16_tflops") or cell.get("record", {}).get("bf16_tflops")
    if seconds is None:
        return "–"
    # a search whose preparation (unit order, statistics) was not timed: its sum is a lower bound
    timed = cell.get("record", {}).get("seconds", {})
    partial = cell.get("kind") == "search" and "search" in timed and "prepare" not in timed
    # a unit order read from the score cache: what it took when computed (maybe on another machine), apart
    cached = f" + {timed['order_cached']:.0f} cached order" if "order_cached" in timed else ""
    return (("≥ " if partial else "") + f"{seconds - timed.get('order_cached', 0):.0f}{cached}"
            + (f" ({peak:.2f})" if peak else ""))


def _zeroshot(cell: dict | None) -> float | None:
    return cell["zeroshot"]["scores"]["average"] if cell and "zeroshot" in cell else None


def zeroshot_standard_error(cell: dict | None) -> float | None:
    """The binomial standard error of a cell's zero-shot average: each task's accuracy p on its first
    ``limit`` questions has variance p(1 - p) / limit, the tasks independent (None without per-task scores)."""
    if _zeroshot(cell) is None:
        return None
    measured = cell["zeroshot"]
    tasks = [p for task, p in measured["scores"].items() if task != "average"]
    if not tasks:
        return None
    return math.sqrt(sum(p * (1 - p) for p in tasks) / measured["limit"]) / len(tasks)


def _zeroshot_table(rows: dict, recipes: list[str], dense: dict | None) -> list[str]:
    """The zero-shot average of each row at the ratios where any was measured (higher is better)."""
    measured = sorted({r for row in rows.values() for r, c in row.items() if _zeroshot(c) is not None}, reverse=True)
    if not measured:
        return []
    limits = sorted({c["zeroshot"]["limit"] for row in rows.values() for c in row.values() if _zeroshot(c) is not None})
    dense_average = _zeroshot(dense)
    lines = [f"## Zero-shot average (seven tasks, first {' / '.join(map(str, limits))} questions each; higher is "
             "better" + (f"; dense {dense_average:.3f}" if dense_average is not None else "") + ")", "",
             "| method | " + " | ".join(f"{r:g}" for r in measured) + " |", "|---|" + "---|" * len(measured)]
    for name in recipes + (["search"] if "search" in rows else []):
        values = ["= search" if _is_search(rows[name].get(r)) else
                  "–" if (v := _zeroshot(rows[name].get(r))) is None else f"{v:.3f}" for r in measured]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return lines + [""]


def seed_cells(cell: dict | None) -> dict[int, dict]:
    """Every seed's cell of a row read from experiments/quality.py (its ``record.from`` names seed 0's),
    by seed; empty for the other rows and for a row that is the search row itself (its seeds are the search's)."""
    if _is_search(cell):
        return {}
    source, _, key = (cell or {}).get("record", {}).get("from", "").rpartition(" ")
    path = Path(source) if Path(source).is_absolute() else ROOT / source
    if not source or not path.is_file():
        return {}
    stem = key.rpartition("/seed")[0]
    found = json.loads(path.read_text())["cells"]
    return {int(seed): c for k, c in found.items() for prefix, _, seed in [k.rpartition("/seed")] if prefix == stem}


def _seed_values(rows: dict, name: str, ratio: float, text: str, short: str,
                 seeds: set[int] | None = None) -> dict[int, float | None]:
    """A row's perplexity of ``text`` (``short``: WikiText-2 in the short windows) at each of its seeds at
    ``ratio`` (those in ``seeds`` where given), by seed; None where a seed has none."""
    cell = rows.get(name, {}).get(ratio)
    return {seed: _seed_short(cell, seed, short) if text == short else c["ppl"].get(text)
            for seed, c in sorted(seed_cells(cell).items()) if seeds is None or seed in seeds}


def _seed_means(rows: dict, name: str, ratio: float, texts: list[str], short: str,
                seeds: set[int] | None = None) -> dict[str, float] | None:
    """The means over a row's seeds at ``ratio`` (those in ``seeds`` where given; None below two), of each
    text every one of them has."""
    values = {t: _seed_values(rows, name, ratio, t, short, seeds) for t in [*texts, short]}
    if len(values[short]) < 2:
        return None
    return {t: sum(v.values()) / len(v) for t, v in values.items() if None not in v.values()}


def _seed_short(cell: dict, seed: int, short: str) -> float | None:
    """A seed's WikiText-2 perplexity in the short windows: seed 0's is the row's, the others' measured by
    compare.py on their exports (``short_by_seed``) where they were on its machine."""
    if seed == 0:
        return _ppl(cell, short)
    return cell.get("short_by_seed", {}).get(str(seed), {}).get(short, {}).get("ppl")


def _seeds_table(rows: dict, ratios: list[float], texts: list[str], short: str) -> list[str]:
    """The rows that are whole searches (read from quality.py: the search and the Týr rows) at every seed
    quality.py ran them: each seed's perplexity and the mean, where there are two or more; WikiText-2 in
    the short windows too, its mean where every seed has it."""
    lines = []
    for name in rows:
        for r in ratios:
            seeds = seed_cells(rows[name].get(r))
            if len(seeds) < 2:
                continue
            means = _seed_means(rows, name, r, texts, short)
            per_seed = {t: list(_seed_values(rows, name, r, t, short).values()) for t in [*texts, short]}
            values = [" / ".join(map(_fmt, per_seed[t])) + (f" (mean {_fmt(means[t])})" if t in means else "")
                      for t in [texts[0], short, *texts[1:]]]
            lines.append(f"| {name} | {r:g} | {', '.join(map(str, sorted(seeds)))} | " + " | ".join(values) + " |")
    if not lines:
        return []
    columns = [texts[0], short.replace("_", " in windows of "), *texts[1:]]
    return ["## Seeds of the searches (windows of 2048 unless named; each seed a whole search, the tables above "
            "show seed 0)", "",
            "| method | ratio | seeds | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns),
            *lines, ""]


def _seeds_verdict(rows: dict, ratio: float, texts: list[str], short: str) -> list[str]:
    """The search's seed means against each Týr row's, over the seeds both ran at ``ratio`` (two or more), with
    the search's difference at each of them: a seed fixes the statistics windows, so the pairs share their
    draw and their differences show whether the means' gap has one sign or is the spread."""
    lines = []
    for name in [n for n in rows if n.startswith("tyr")]:
        shared = set(seed_cells(rows.get(name, {}).get(ratio))) & set(seed_cells(rows.get("search", {}).get(ratio)))
        search, tyr = (_seed_means(rows, n, ratio, texts, short, shared) for n in ("search", name))
        if search is None or tyr is None:
            continue
        lines.append(f"- {ratio:g}, means over seeds {', '.join(map(str, sorted(shared)))}, {name} against the "
                     "search: " + "; ".join(
                         f"{t.replace('_', ' in windows of ')} {tyr[t]:.2f} vs {search[t]:.2f} "
                         f"({(search[t] - tyr[t]) / tyr[t]:+.1%}{_paired(rows, name, ratio, t, short)})"
                         for t in [*texts, short] if t in tyr and t in search))
    return lines


def _paired(rows: dict, name: str, ratio: float, text: str, short: str) -> str:
    """The search's relative difference to row ``name`` at each seed both have ``text`` for."""
    theirs, ours = (_seed_values(rows, n, ratio, text, short) for n in (name, "search"))
    pairs = [(theirs[s], ours[s]) for s in sorted(set(theirs) & set(ours)) if None not in (theirs[s], ours[s])]
    return "; per seed " + " / ".join(f"{(b - a) / a * 100:+.1f}" for a, b in pairs) + " %" if pairs else ""


def _count(n: int, noun: str) -> str:
    return noun if n == 1 else f"{n} {noun}s"


def _calibration(cal: dict | None) -> str:
    if not cal:
        return "none (weights only)"
    return f"{cal['nsamples']} x {cal['seqlen']} ({cal['dataset']} {cal['split']})"


def _chosen(recipe: dict) -> str:
    selected = recipe["selected"]
    if "best" in selected:
        return f"subset {selected['best']['calibration_subset']}, {selected['best']['metric']}"
    return f"seed {recipe['calibration']['seed']}"


def _base(name: str) -> str:
    """The recipe of a row: "flap (paper calibration)" -> "flap" (compare.py's --label)."""
    return name.split(" (")[0]


def _plot(rows, recipes, dense, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # a recipe and its labelled variant rows share a colour (the variants dotted); the search is black
    bases = list(dict.fromkeys(_base(name) for name in recipes))
    palette = plt.get_cmap("tab10")
    for name in recipes + (["search"] if "search" in rows else []):
        points = sorted((r, _ppl(c, "wikitext2_2048")) for r, c in rows[name].items()
                        if _ppl(c, "wikitext2_2048") is not None)
        if not points:
            continue
        if name == "search":
            style = {"color": "black", "linewidth": 2.5}
        else:
            style = {"color": palette(bases.index(_base(name)) % 10), "linewidth": 1.2,
                     "linestyle": "-" if _base(name) == name else ":"}
        ax.plot(*zip(*points), marker="o", markersize=4, label=name, **style)
    if dense is not None:
        ax.axhline(_ppl(dense, "wikitext2_2048"), color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of block weights")
    ax.set_ylabel("WikiText-2 perplexity (2048)")
    ax.invert_xaxis()
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
