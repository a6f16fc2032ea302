"""GGUF export for llama.cpp's deci architecture: per-layer arrays, tensor shapes and values read
back with gguf's own reader, removed sub-layers expressed exactly, refusals before any writing."""

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from search.cli import main
from space.adapters import adapter_for
from space.errors import UserError
from space.export import export_subnet
from space.export.gguf import plan_gguf, rope_permute, write_gguf
from space.order import LayerOrder
from space.subnet import LayerWidths, Subnet

# Layer 0: attention removed (kept as one zero head: llama.cpp reads the head size from layer 0);
# layer 1: MLP removed (one zero channel); layer 2: GQA with fewer groups; layer 3: both removed.
LAYERS = [LayerWidths(0, 0, 64), LayerWidths(1, 2, 0), LayerWidths(2, 3, 80), LayerWidths(0, 0, 0)]
WIDE = {"layers": 4, "hidden_size": 64, "num_attention_heads": 8}  # rows of 64: q8_0 blocks of 32 fit


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most 128 entries (the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = ["the cat sat on the mat and the dog sat on the log"] * 20
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=100, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def export(model, out, layers=LAYERS, *, overrides=None, tokenizer=True):
    adapter = adapter_for(model)
    subnet = Subnet(adapter.dims, layers)
    orders = [LayerOrder.identity(adapter.dims)] * len(layers)
    export_subnet(adapter, subnet, orders, out, tokenizer=bpe_tokenizer() if tokenizer else None,
                  overrides=overrides)
    return load_file(out / "model.safetensors")


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def values(tensor) -> torch.Tensor:
    shape = [int(n) for n in reversed(tensor.shape)]
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))).reshape(shape)


def test_a_heterogeneous_export_reads_back_with_its_widths_shapes_and_weights(make_model, tmp_path):
    model = make_model("llama", **WIDE)
    bias = {"model.layers.2.self_attn.o_proj.bias": torch.randn(64), "model.layers.2.mlp.down_proj.bias": torch.randn(64)}
    state = export(model, tmp_path / "out", overrides=bias)
    write_gguf(plan_gguf(tmp_path / "out"), tmp_path / "m.gguf", "f32")
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [1, 2, 6, 0]
    assert fields["deci.attention.head_count_kv"] == [1, 1, 2, 0]
    assert fields["deci.feed_forward_length"] == [64, 1, 80, 1]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert not any(name.startswith("blk.3.attn") for name in tensors)  # 0 heads: llama.cpp loads none
    assert "output.weight" in tensors  # untied head
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    heads = {"attn_q": [1, 2, 6, 0], "attn_k": [1, 1, 2, 0]}
    checked = 0
    for name, tensor in tensors.items():
        if not name.startswith("blk."):
            continue
        _, i, part, kind = name.split(".")
        key = f"model.layers.{i}.{hf[part]}.{kind}"
        got = values(tensor)
        if (i, part) in (("0", "attn_output"), ("1", "ffn_down")):
            assert not got.any()  # the zero head / channel adds nothing
        elif key in state:
            expected = rope_permute(state[key], heads[part][int(i)]) if part in heads else state[key]
            assert torch.equal(got, expected), name
            checked += 1
    assert checked == len([k for k in state if k.startswith("model.layers.") and not k.startswith("model.layers.3.input")])
    assert torch.equal(values(tensors["blk.2.attn_output.bias"]), bias["model.layers.2.self_attn.o_proj.bias"])
    assert torch.equal(values(tensors["token_embd.weight"]), state["model.embed_tokens.weight"])


def test_rope_permute_turns_half_split_rope_into_pairwise_rope():
    torch.manual_seed(0)
    heads, dim, pos = 3, 8, 5
    q = torch.randn(heads * dim, 16)
    x = torch.randn(16)
    theta = pos / 10000 ** (torch.arange(0, dim, 2) / dim)
    cos, sin = theta.cos(), theta.sin()
    half = (q @ x).view(heads, 2, dim // 2)  # Hugging Face: pairs (i, i + d/2)
    hf = torch.stack([half[:, 0] * cos - half[:, 1] * sin, half[:, 1] * cos + half[:, 0] * sin], 1)
    pairs = (rope_permute(q, heads) @ x).view(heads, dim // 2, 2)  # llama.cpp: pairs (2i, 2i + 1)
    ggml = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    assert torch.allclose(ggml.reshape(-1), rope_permute(hf.reshape(-1), heads), atol=1e-6)


def test_f16_and_q8_0_types(make_model, tmp_path):
    state = export(make_model("llama", **WIDE), tmp_path / "out")
    plan = plan_gguf(tmp_path / "out")
    _, f16 = read(write_gguf(plan, tmp_path / "f16.gguf", "f16"))
    assert f16["blk.2.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert f16["blk.2.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(values(f16["blk.2.ffn_up.weight"]), state["model.layers.2.mlp.up_proj.weight"].half().float())
    _, q8 = read(write_gguf(plan, tmp_path / "q8.gguf", "q8_0"))
    Q = gguf.GGMLQuantizationType
    assert q8["blk.2.ffn_up.weight"].tensor_type == q8["token_embd.weight"].tensor_type == Q.Q8_0  # rows of 64
    assert q8["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0  # rows of 64
    assert q8["blk.2.ffn_down.weight"].tensor_type == Q.F16  # rows of 80: not a multiple of 32
    assert q8["blk.2.attn_output.weight"].tensor_type == Q.F16  # rows of 48: not a multiple of 32
    assert q8["blk.1.ffn_down.weight"].tensor_type == Q.F16  # the one-channel stand-in
    up = state["model.layers.2.mlp.up_proj.weight"]
    assert (values(q8["blk.2.ffn_up.weight"]) - up).abs().max() <= up.abs().max() / 100


def test_qwen2_qkv_biases_are_written_permuted(make_model, tmp_path):
    state = export(make_model("qwen2", layers=2), tmp_path / "out", [LayerWidths(2, 3, 96), LayerWidths(1, 2, 32)])
    _, tensors = read(write_gguf(plan_gguf(tmp_path / "out"), tmp_path / "m.gguf", "f32"))
    assert torch.equal(values(tensors["blk.1.attn_q.bias"]), rope_permute(state["model.layers.1.self_attn.q_proj.bias"], 2))
    assert torch.equal(values(tensors["blk.1.attn_k.bias"]), rope_permute(state["model.layers.1.self_attn.k_proj.bias"], 1))
    assert torch.equal(values(tensors["blk.1.attn_v.bias"]), state["model.layers.1.self_attn.v_proj.bias"])


@pytest.mark.parametrize("case, message", [
    ("qwen3", "only llama, mistral, qwen2"),
    ("no tokenizer", "no tokenizer.json"),
    ("word-level tokenizer", "only byte-level BPE"),
    ("not an export", "not an llm-pruner export"),
])
def test_refused_exports_are_user_errors(make_model, tmp_path, case, message):
    out = tmp_path / "out"
    layers = [LayerWidths(2, 3, 96)] * 2
    if case == "not an export":
        out.mkdir()
        (out / "config.json").write_text("{}")
    else:
        export(make_model("qwen3" if case == "qwen3" else "llama", layers=2), out, layers,
               tokenizer=case != "no tokenizer")
    if case == "word-level tokenizer":
        from tests.conftest import tiny_tokenizer

        tiny_tokenizer().save_pretrained(out)
    with pytest.raises(UserError, match=message):
        plan_gguf(out)


def test_cli_writes_a_run_winner_and_exits_2_on_bad_input(make_model, tmp_path, capsys):
    run = tmp_path / "run"
    export(make_model("llama", layers=2), run / "export", [LayerWidths(2, 3, 96), LayerWidths(1, 3, 64)])
    (run / "config.yaml").write_text("model: tiny\n")
    assert main(["-q", "export-gguf", str(run), "--out", str(tmp_path / "w.gguf"), "--type", "q8_0"]) == 0
    fields, _ = read(tmp_path / "w.gguf")
    assert fields["deci.attention.head_count"] == [6, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "w.gguf"]  # no temporary file left
    (tmp_path / "empty").mkdir()
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / "config.yaml").write_text("model: tiny\n")
    for folder, message in (("missing", "does not exist"), ("empty", "not an llm-pruner export"),
                            ("pending", "has no export/")):
        assert main(["-q", "export-gguf", str(tmp_path / folder), "--out", str(tmp_path / "x.gguf")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
    assert main(["-q", "export-gguf", str(run), "--out", str(tmp_path / "empty")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_failed_write_leaves_no_file(make_model, tmp_path, monkeypatch):
    export(make_model("llama", layers=2), tmp_path / "out", [LayerWidths(2, 3, 96)] * 2)
    plan = plan_gguf(tmp_path / "out")
    monkeypatch.setattr(gguf.quants, "quantize", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(plan, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
