"""Local vs sequential least squares on SmolLM2-135M as pruning deepens (why local is the default).

Subnets: wanda-sp order (64 x 512 validation tokens), attention whole, the MLP of the first n
layers cut to 512 of 1536 channels (n = 2, 8, 30); rectified from 8 x 512 validation tokens by
``lstsq`` in both modes (damping 1e-4 x mean diag C), then with damping 1e-2 and 1e-1 at n = 30.
Perplexity: WikiText-2 test, the first 4 windows of 512 tokens, float32. Prints every value and
the largest difference between the two modes' rectified down_proj per layer.

    LLM_PRUNER_DATA=../shared/data .venv/bin/python experiments/reform_modes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.data import CalibrationSpec, dataset_windows  # noqa: E402
from evaluators.environment import environment  # noqa: E402
from evaluators.perplexity import perplexity  # noqa: E402
from reform.rectify import ReformSpec, rectify  # noqa: E402
from search.prepare import dense_scores
from space.order import order_model  # noqa: E402
from space.adapters import adapter_for  # noqa: E402
from space.export import write_json  # noqa: E402
from space.models import load_model  # noqa: E402
from space.views import subnet_view  # noqa: E402
from space.subnet import LayerWidths, Subnet  # noqa: E402

OUT = Path(__file__).parent / "results" / "reform_modes.json"


def main() -> None:
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    adapter = adapter_for(loaded.model)
    scores = dense_scores(loaded, ["wanda-sp"], CalibrationSpec("wikitext2", 64, 512, 0)).scores["wanda-sp"]
    order_model(adapter, scores)
    dense = Subnet.dense(adapter.dims)
    test = dataset_windows(loaded.tokenizer, "wikitext2", seqlen=512, limit=4)
    windows = CalibrationSpec("wikitext2", 8, 512, 0).windows(loaded.tokenizer)
    rows = []

    def cut(n: int) -> Subnet:
        return Subnet(adapter.dims, [LayerWidths(w.kv_heads, w.q_per_kv, 512) if i < n else w
                                     for i, w in enumerate(dense.layers)])

    def score(subnet, overrides) -> float:
        with subnet_view(adapter, subnet, overrides) as model:
            return perplexity(model, test)

    for n in (2, 8, 30):
        subnet = cut(n)
        rows.append({"layers_cut": n, "mode": "none", "damping": None, "ppl": score(subnet, {})})
        solved = {}
        for mode in ("local", "sequential"):
            solved[mode] = rectify(adapter, subnet, windows, spec=ReformSpec("lstsq", mode))
            rows.append({"layers_cut": n, "mode": mode, "damping": 1e-4, "ppl": score(subnet, solved[mode])})
        rows.append({"layers_cut": n, "max_abs_difference_per_layer": {
            k: float((solved["local"][k] - solved["sequential"][k]).abs().max()) for k in solved["local"]}})
    for damping in (1e-2, 1e-1):
        for mode in ("local", "sequential"):
            overrides = rectify(adapter, cut(30), windows, spec=ReformSpec("lstsq", mode, damping=damping))
            rows.append({"layers_cut": 30, "mode": mode, "damping": damping, "ppl": score(cut(30), overrides)})
    for row in rows:
        if "ppl" in row:
            print(f"{row['layers_cut']:>2} layers cut  {row['mode']:<10}  damping {row['damping']}  ppl {row['ppl']:.2f}")
    write_json(OUT, {"rows": rows, "environment": environment()})


if __name__ == "__main__":
    main()
