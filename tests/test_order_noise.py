"""experiments/order_noise.py: the orders it computes again and its table."""

from __future__ import annotations

from pathlib import Path

import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_each_variant_computes_the_order_on_the_orders_windows(monkeypatch, make_model):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import order_noise
    from search.config import SearchConfig

    class Spec:
        def windows(self, tokenizer):
            return "windows"

    class Loaded:
        model = make_model("llama")
        tokenizer = None

    asked = []
    monkeypatch.setattr(order_noise, "load_model", lambda *a, **k: Loaded())
    monkeypatch.setattr(order_noise, "compute_scores", lambda adapter, windows, names, *, ratio, pass_dtype, batch_size:
                        asked.append((windows, names, ratio, pass_dtype, batch_size)) or {names[0]: ["scores"]})
    config = SearchConfig.create(model="m", ratio=0.5, importance="osscar", order_nsamples=256, nsamples=64)
    monkeypatch.setattr(type(config), "order_calibration_spec", lambda self: Spec())
    for variant in ("float32, batches of 4", "bfloat16 passes"):
        scores, seconds = order_noise.order(config, order_noise.VARIANTS[variant])
        assert scores == ["scores"] and seconds >= 0
    assert asked == [("windows", ["osscar"], 0.5, None, 4), ("windows", ["osscar"], 0.5, torch.bfloat16, 8)]


def test_the_table_compares_each_order_with_the_runs_own(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import order_noise

    def row(validation, share):
        return {"order_s": 400.0, "ptb_validation": validation, "channels_kept_share": [share, 1.0],
                "heads_kept_share": [1.0, 1.0]}

    cell = {"run_dir": "runs/x", "variants": {"own order": row(100.0, 1.0), "bfloat16 passes": row(104.0, 0.9)}}
    text = order_noise.report({"cells": {"runs/x": cell}, "command": "cmd", "bf16_tflops": 0.4, "fp32_tflops": 0.2,
                               "environment": {"machine": {"cpu": "cpu", "threads": 2}}})
    assert "| runs/x | own order | 400 | 1.0000 / 1.0000 | 1.000 | 100.00 | +0.0 % |" in text
    assert "| runs/x | bfloat16 passes | 400 | 0.9500 / 0.9000 | 1.000 | 104.00 | +4.0 % |" in text
