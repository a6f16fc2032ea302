import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import FAMILIES
from space.order import order_model
from space.adapters import adapter_for
from space.errors import UserError
from space.export import SUBNET_FILE, export_subnet
from space.scores import compute_scores
from space.views import subnet_view
from space.subnet import LayerWidths, Subnet

# Layer 0: GQA with fewer heads per group; layer 1: no attention; layer 2: no MLP.
MIXED = [LayerWidths(1, 2, 50), LayerWidths(0, 0, 17), LayerWidths(2, 3, 0)]
MIXED_MHA = [LayerWidths(4, 1, 50), LayerWidths(0, 0, 17), LayerWidths(3, 1, 0)]


def exported(model, token_ids, layers, out_dir, **kwargs):
    adapter = adapter_for(model)
    scores = compute_scores(adapter, token_ids, ["wanda-sp"])["wanda-sp"]
    orders, _ = order_model(adapter, scores)
    subnet = Subnet(adapter.dims, layers)
    with subnet_view(adapter, subnet) as m:
        expected = m(token_ids).logits
    export_subnet(adapter, subnet, orders, out_dir, **kwargs)
    return adapter, subnet, orders, expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads", [2, 6])
def test_export_reloads_with_the_same_logits(make_model, token_ids, tmp_path, name, kv_heads):
    layers = MIXED if kv_heads == 2 else MIXED_MHA
    _, subnet, _, expected = exported(make_model(name, kv_heads=kv_heads), token_ids, layers, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert (reloaded(token_ids).logits - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in reloaded.parameters()) == subnet.total_params()
    assert type(reloaded.model.layers[1].self_attn).__name__ == "SkippedAttention"
    assert type(reloaded.model.layers[2].mlp).__name__ == "SkippedMLP"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_uniform_subnet_exports_a_stock_config_that_loads_without_remote_code(make_model, token_ids, tmp_path,
                                                                              name):
    layers = [LayerWidths(1, 2, 40)] * 3  # fewer groups and heads per group than the model: still stock GQA
    _, subnet, _, expected = exported(make_model(name), token_ids, layers, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # no trust_remote_code
    assert (reloaded(token_ids).logits - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in reloaded.parameters()) == subnet.total_params()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    family = "mistral" if name == "phi3" else name  # Phi-3 is pruned and exported unfused (space/unfuse.py)
    assert config["model_type"] == family and "auto_map" not in config and "per_layer_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 40)
    assert not (tmp_path / "out" / "modeling_llm_pruner.py").exists()
    assert json.loads((tmp_path / "out" / SUBNET_FILE).read_text())["config"] == "stock"
    if name == "llama":  # in a fresh interpreter that never imported this package
        torch.save({"ids": token_ids, "expected": expected}, tmp_path / "io.pt")
        script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
                  "io = torch.load(sys.argv[2]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
                  "print(float((m(io['ids']).logits - io['expected']).abs().max()))")
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), str(tmp_path / "io.pt")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0 and float(done.stdout.strip().splitlines()[-1]) <= 1e-4, done.stderr[-2000:]


def test_reloaded_export_generates_like_a_cacheless_greedy_loop(make_model, token_ids, tmp_path):
    exported(make_model("llama"), token_ids, MIXED, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    prompt = token_ids[:1, :8]
    generated = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, ids)


def test_export_records_the_subnet_and_the_kept_units(make_model, token_ids, tmp_path):
    _, subnet, orders, _ = exported(make_model("llama"), token_ids, MIXED, tmp_path / "out",
                                    metadata={"recipe": {"importance": "wanda-sp"}})
    record = json.loads((tmp_path / "out" / SUBNET_FILE).read_text())
    assert Subnet.from_dict(record["subnet"]) == subnet
    assert record["recipe"] == {"importance": "wanda-sp"}
    kept = record["kept"][0]
    assert kept["kv_heads"] == orders[0].groups[:1].tolist()
    assert len(kept["heads"]) == 2 and len(kept["channels"]) == 50
    assert all(h // 3 == kept["kv_heads"][0] for h in kept["heads"])  # heads of the kept group
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["head_dim"] == 8 and config["model_type"] == "llm_pruner_llama"
    assert config["per_layer_config"]["1"]["skip"] == ["self_attn"]
    assert (tmp_path / "out" / "modeling_llm_pruner.py").is_file()
    assert record["config"] == "per-layer"


def test_a_folder_that_is_not_an_export_is_refused_untouched(make_model, token_ids, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an llm-pruner export"):
        exported(make_model("llama"), token_ids, MIXED, target)
    assert os.listdir(target) == ["notes.txt"]


def test_a_failed_export_leaves_the_previous_export_intact(make_model, token_ids, tmp_path, monkeypatch):
    out = tmp_path / "out"
    exported(make_model("llama"), token_ids, MIXED, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    from space import modeling_llm_pruner

    monkeypatch.setattr(modeling_llm_pruner.PrunedLlamaForCausalLM, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        exported(make_model("llama", seed=1), token_ids, MIXED, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("skipped_first", [False, True])
def test_an_export_with_skipped_sublayers_generates_with_each_cache(make_model, token_ids, tmp_path, cache,
                                                                    skipped_first):
    """A layer without attention (the first one, whose cache length positions new tokens, or a
    later one) and one without MLP: a static cache (sized per layer on first use) and the dynamic
    one give the tokens of a cacheless greedy loop."""
    layers = [MIXED[1], MIXED[0], MIXED[2]] if skipped_first else MIXED
    exported(make_model("llama"), token_ids, layers, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    prompt = token_ids[:1, :8]
    generated = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                               cache_implementation=cache)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, ids)


def test_an_export_without_its_first_attention_generates_under_torch_compile(make_model, token_ids, tmp_path):
    """A compiled forward (TorchDynamo traces it; the eager backend keeps the test in seconds, the
    inductor backend was checked once by hand) with a static cache gives the cacheless greedy tokens."""
    exported(make_model("llama"), token_ids, [MIXED[1], MIXED[0], MIXED[2]], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    prompt = token_ids[:1, :8]
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=False)
    generated = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                               cache_implementation="static")
    assert torch.equal(generated, ids)
