"""experiments/device_check.py, the prepared GPU run of issue 15, on this CPU: a random model drawn from
a prepared config and tokenizer, the searches with both solver placements, their plan beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.slow
def test_the_device_run_searches_a_random_model_of_the_prepared_config(tiny_model_dir, tiny_data, tmp_path,
                                                                       monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import device_check

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_model_dir, prepared / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "out"
    assert device_check.main(["run", "--out", str(out), "--prepared", str(prepared), "--workdir", str(tmp_path / "w"),
                              "--device", "cpu", "--sizes", "tiny", "--trials", "8", "--eval-windows", "1"]) == 0
    result = json.loads((out / "device_check.json").read_text())
    assert [row["solver_device"] for row in result["searches"]] == ["model", "cpu"]
    for row in result["searches"]:
        assert row["measured_trials"] > 0 and row["seconds_per_candidate"] > 0
        assert row["plan_peak_bytes"] > row["plan"]["weights_bytes"] > 0
        assert row["test_ppl"] > 1
    # the weights were drawn there (seed 0), not carried: not the tiny model's own
    drawn = AutoModelForCausalLM.from_pretrained(tmp_path / "w" / "smollm2-random")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not all(a.equal(b.to(a.dtype)) for a, b in zip(drawn.parameters(), original.parameters()))
    assert "gpu_tests" not in result  # the CUDA tests run on a GPU only
