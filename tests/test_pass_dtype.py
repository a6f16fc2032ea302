"""experiments/pass_dtype.py: the kept-unit shares it reports and its table's row."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_shares_and_the_table_row(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import pass_dtype

    first = [{"channels": [0, 1, 2, 3], "heads": [0, 1]}, {"channels": [], "heads": [2]}]
    second = [{"channels": [3, 2, 9, 8], "heads": [1, 0]}, {"channels": [5], "heads": [3]}]
    assert pass_dtype.shares(first, second, "channels") == [0.5, 1.0]  # a layer that keeps none: all shared
    assert pass_dtype.shares(first, second, "heads") == [1.0, 0.0]
    assert pass_dtype.spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == 0.5
    ppl = {"validation": 105.0, "wikitext2": 43.0, "ptb": 110.0, "c4:heldout": 93.0}
    cell = {"run_dir": "runs/x", "order": {"seconds": {"float32": 795.0, "bfloat16": 400.0},
                                           "channels_kept_share": [0.5, 1.0], "heads_kept_share": [1.0, 0.0]},
            "fitness_statistics": {"seconds": {"float32": 300.0, "bfloat16": 200.0}, "spearman": 0.99,
                                   "max_relative_change": 0.03, "trials": [1, 2, 3]},
            "search": ppl, "bfloat16_order": {**ppl, "validation": 106.0, "ptb": 112.0}}
    text = pass_dtype.report({"cells": {"runs/x": cell}, "bf16_tflops": 0.4,
                              "environment": {"machine": {"cpu": "cpu"}}, "command": "cmd"})
    assert ("| runs/x | 795 / 400 | 0.7500 / 0.5000 | 0.000 | 300 / 200 | 0.9900 (3) | 3.00e-02 | 105.00 / 106.00 | "
            "43.00 / 110.00 / 93.00 vs 43.00 / 112.00 / 93.00 |") in text


def test_the_orders_are_computed_on_the_orders_own_windows(monkeypatch, make_model):
    """The order has its own window count (``order_nsamples``) since 2026-12-07: both dtypes' orders are
    asked for on those windows, not on the fitness statistics'."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import pass_dtype
    from search import prepare
    from search.config import SearchConfig

    asked = []

    class Loaded:
        model = make_model("llama")
        tokenizer = None
        source = type("Source", (), {"path": "tiny"})()

    class Cache:
        def scores(self, adapter, names, *, calibration, pass_dtype, **_):
            asked.append((calibration["nsamples"], pass_dtype))
            return type("Scored", (), {"scores": {names[0]: []}, "seconds": 1.0, "reused": False})()

    monkeypatch.setattr(pass_dtype, "load_model", lambda *a, **k: Loaded())
    monkeypatch.setattr(prepare, "ScoreCache", Cache)
    config = SearchConfig.create(model="m", ratio=0.5, importance="osscar", order_nsamples=256, nsamples=64)
    pass_dtype.orders(config)
    assert asked == [(256, None), (256, pass_dtype.HALF)]
