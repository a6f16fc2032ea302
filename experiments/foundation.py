"""Foundation measurements (issue 2) on SmolLM2-135M.

1. Dense WikiText-2 test perplexity at 2048 tokens, all windows, float32 and bfloat16.
2. One-shot pruning without compensation: importance {magnitude, wanda-sp, fluctuation, obs} x
   allocation {uniform, uniform-mlp, global} x ratio {0.9 .. 0.5}, perplexity on the first
   ``--windows`` test windows (bfloat16; the wanda-sp/uniform-mlp row also in float32, the
   reference row of PROTOCOL.md).
3. Time to evaluate one candidate through prefix views vs through a physical copy, same subnet,
   same windows, alternated in one run.

Every candidate is evaluated in-process through ``subnet_view`` (the export reproduces it
exactly; tests/test_export.py checks logits). Finished cells are kept in the JSON, so re-running
resumes.

    LLM_PRUNER_DATA=../shared/data python experiments/foundation.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from evaluators.data import CalibrationSpec, dataset_windows
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from search.cli.common import parse_args_with_config
from search.oneshot.allocation import allocate
from space.order import order_model
from space.adapters import adapter_for
from space.export import write_json
from space.scores import SCORES, compute_scores
from space.models import load_model
from space.modeling_llm_pruner import PRUNED_CLASSES
from space.export.state import sliced_state_dict
from space.views import subnet_view
from space.export.config import pruned_config

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)
IMPORTANCES = ("magnitude", "wanda-sp", "fluctuation", "obs")
ALLOCATIONS = ("uniform", "uniform-mlp", "global")  # the recipes add more; these are the foundation's


def physical_copy(adapter, subnet):
    """The subnet as a separate, physically sliced model (what a copy-based search does)."""
    config = pruned_config(adapter.config, subnet)
    cls = PRUNED_CLASSES["llama"][1]
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(sliced_state_dict(adapter, subnet), strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(adapter.decoder().rotary_emb)(config=adapter.config)
    return model.eval()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="test windows per pruned cell")
    parser.add_argument("--out", type=Path, default=RESULTS / "foundation.json")
    parser.add_argument("--skip-dense", action="store_true")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("cells", {})
    save = lambda: write_json(args.out, results)  # noqa: E731

    loaded = load_model("smollm2-135m", dtype=torch.float32)
    tokenizer = loaded.tokenizer
    test_all = dataset_windows(tokenizer, "wikitext2", seqlen=2048)
    test = test_all[: args.windows]
    calibration = CalibrationSpec("wikitext2", 64, 512, 0)
    results["config"] = {
        "model": loaded.source.to_dict(), "seqlen": 2048, "windows_pruned": args.windows,
        "windows_dense": int(test_all.shape[0]), "calibration": calibration.to_dict(),
        "ratios": RATIOS, "importances": IMPORTANCES, "allocations": list(ALLOCATIONS),
    }
    results["environment"] = environment()

    # 1. dense
    if not args.skip_dense:
        for dtype in ("float32", "bfloat16"):
            key = f"dense/{dtype}/all"
            if key not in results["cells"]:
                model = copy.deepcopy(loaded.model).to(getattr(torch, dtype))
                t = time.time()
                ppl = perplexity(model, test_all)
                results["cells"][key] = {"ppl": ppl, "seconds": time.time() - t, "windows": int(test_all.shape[0])}
                del model
                save()
            print(key, results["cells"][key]["ppl"])
        for dtype in ("float32", "bfloat16"):
            key = f"dense/{dtype}/{args.windows}"
            if key not in results["cells"]:
                model = copy.deepcopy(loaded.model).to(getattr(torch, dtype))
                results["cells"][key] = {"ppl": perplexity(model, test), "windows": args.windows}
                del model
                save()

    # 2. one-shot table
    t = time.time()
    adapter = adapter_for(loaded.model)
    scores = compute_scores(adapter, calibration.windows(tokenizer), list(IMPORTANCES))
    results["importance_seconds_all_four"] = time.time() - t
    for importance in IMPORTANCES:
        model = copy.deepcopy(loaded.model)
        ad = adapter_for(model)
        _, ordered = order_model(ad, scores[importance])
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        ad_bf16 = adapter_for(bf16)
        for allocation in ALLOCATIONS:
            for ratio in RATIOS:
                subnet = allocate(allocation, ad.dims, ordered, ratio=ratio,
                                  standardized=SCORES[importance].standardized)
                dtypes = ["bfloat16"] + (["float32"] if (importance, allocation) == ("wanda-sp", "uniform-mlp") else [])
                for dtype in dtypes:
                    key = f"{importance}/{allocation}/{ratio}/{dtype}"
                    if key in results["cells"]:
                        continue
                    target = ad_bf16 if dtype == "bfloat16" else ad
                    t = time.time()
                    with subnet_view(target, subnet) as m:
                        ppl = perplexity(m, test)
                    results["cells"][key] = {
                        "ppl": ppl, "seconds": time.time() - t, "block_ratio": subnet.ratio(),
                        "total_ratio": subnet.total_ratio(), "attention_ratio": subnet.attention_ratio(),
                        "mlp_ratio": subnet.mlp_ratio(),
                        "widths": [[w.kv_heads, w.q_per_kv, w.channels] for w in subnet.layers],
                    }
                    save()
                    print(key, round(ppl, 3), f"{time.time() - t:.0f}s", flush=True)
        del model, bf16

    # 3. views vs physical copy, one candidate, calibration-sized windows, alternated
    if "candidate_timing" not in results:
        model = copy.deepcopy(loaded.model).to(torch.bfloat16)
        ad = adapter_for(model)
        _, ordered = order_model(ad, scores["wanda-sp"])
        subnet = allocate("global", ad.dims, ordered, ratio=0.7)
        windows = CalibrationSpec("wikitext2", 8, 512, 1).windows(tokenizer)
        view_times, copy_times, copy_build = [], [], []
        ppl_view = ppl_copy = None
        for _ in range(3):
            t = time.time()
            with subnet_view(ad, subnet) as m:
                ppl_view = perplexity(m, windows, batch_size=8)
            view_times.append(time.time() - t)
            t = time.time()
            physical = physical_copy(ad, subnet)
            copy_build.append(time.time() - t)
            ppl_copy = perplexity(physical, windows, batch_size=8)
            copy_times.append(time.time() - t)
            del physical
        results["candidate_timing"] = {
            "subnet": "wanda-sp / global / 0.7, bfloat16", "windows": "8 x 512 (wikitext2 validation)",
            "view_seconds": view_times, "copy_seconds_total": copy_times, "copy_seconds_build": copy_build,
            "median_view": statistics.median(view_times), "median_copy": statistics.median(copy_times),
            "ppl_view": ppl_view, "ppl_copy": ppl_copy,
        }
        save()
    results["wall_seconds_this_run"] = time.time() - started
    save()
    write_markdown(results, args.out.with_suffix(".md"))


def write_markdown(results: dict, path: Path) -> None:
    cells = results["cells"]
    windows = results["config"]["windows_pruned"]
    lines = ["# Foundation measurements (issue 2): SmolLM2-135M", ""]
    env = results["environment"]
    lines += [f"Machine: {env['machine']['cpu']}, {env['machine']['threads']} threads; "
              f"torch {env['versions'].get('torch')}, transformers {env['versions'].get('transformers')}.", ""]
    lines += ["Reproduce: `LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/foundation.py --windows 8` "
              "(the same: `python experiments/foundation.py --config experiments/configs/foundation/foundation.yaml`; "
              "raw numbers in `foundation.json`).", ""]
    lines += ["## Dense WikiText-2 test perplexity, seqlen 2048", "", "| dtype | windows | perplexity |", "|---|---|---|"]
    for key, cell in cells.items():
        if key.startswith("dense/"):
            _, dtype, n = key.split("/")
            lines.append(f"| {dtype} | {cell.get('windows', n)} | {cell['ppl']:.3f} |")
    lines += ["", f"## One-shot pruning, no compensation: WikiText-2 test perplexity (first {windows} windows of 2048)", "",
              "Ratio = kept fraction of block weights (every cell lands within 0.5 % of it). bfloat16 unless marked.", ""]
    header = "| importance | allocation | " + " | ".join(str(r) for r in RATIOS) + " |"
    lines += [header, "|---|---|" + "---|" * len(RATIOS)]
    for importance in IMPORTANCES:
        for allocation in ALLOCATIONS:
            for dtype in ("bfloat16", "float32"):
                row = [cells.get(f"{importance}/{allocation}/{r}/{dtype}") for r in RATIOS]
                if not any(row):
                    continue
                values = " | ".join(f"{c['ppl']:.2f}" if c else "–" for c in row)
                mark = "" if dtype == "bfloat16" else " (float32)"
                lines.append(f"| {importance} | {allocation}{mark} | {values} |")
    timing = results.get("candidate_timing")
    if timing:
        lines += ["", "## Evaluating one candidate: prefix views vs a physical copy", "",
                  f"Same subnet ({timing['subnet']}), same windows ({timing['windows']}), alternated 3 times in one run.", "",
                  "| path | median seconds | of which building the copy | perplexity |", "|---|---|---|---|",
                  f"| prefix views | {timing['median_view']:.2f} | 0 | {timing['ppl_view']:.3f} |",
                  f"| physical copy | {timing['median_copy']:.2f} | {statistics.median(timing['copy_seconds_build']):.2f} | "
                  f"{timing['ppl_copy']:.3f} |"]
    notes = path.with_suffix(".notes.md")  # hand-written findings, kept across re-runs
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
