"""A few end-to-end checks on the real SmolLM2-135M model and the real data (marked ``real``)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluators.data import dataset_windows
from evaluators.perplexity import perplexity
from search.oneshot.allocation import allocate
from space.order import order_model
from space.adapters import adapter_for
from space.export import export_subnet
from space.scores import compute_scores
from space.views import subnet_view

pytestmark = pytest.mark.real


def test_dense_perplexity_in_float32_and_bfloat16(real_model, real_data):
    windows = dataset_windows(real_model.tokenizer, "wikitext2", seqlen=2048, limit=1)
    fp32 = perplexity(real_model.model, windows)
    bf16 = perplexity(copy.deepcopy(real_model.model).to(torch.bfloat16), windows)
    assert 10 < fp32 < 40  # 21.84 over the first 32 windows (PROTOCOL.md)
    assert abs(bf16 - fp32) / fp32 < 0.03


def test_pruned_smollm2_exports_reloads_and_generates(real_model, real_data, tmp_path):
    model = copy.deepcopy(real_model.model)
    adapter = adapter_for(model)
    scores = compute_scores(adapter, None, ["magnitude"])["magnitude"]  # weights only: no calibration pass
    orders, ordered = order_model(adapter, scores)
    subnet = allocate("global", adapter.dims, ordered, ratio=0.8)
    assert abs(subnet.ratio() - 0.8) <= 0.004
    ids = real_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with subnet_view(adapter, subnet) as view:
        expected = view(ids).logits
    export_subnet(adapter, subnet, orders, tmp_path / "out", tokenizer=real_model.tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert (reloaded(ids).logits - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in reloaded.parameters()) == subnet.total_params()
    out = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
