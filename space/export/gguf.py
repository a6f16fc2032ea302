"""An export as one GGUF file for llama.cpp (``llm-pruner export-gguf``).

llama.cpp's ``deci`` architecture (how it runs Nemotron-51B) reads per-layer ``head_count``,
``head_count_kv`` and ``feed_forward_length`` arrays, so one file holds every layer at its own
widths; a uniform export is written the same way. What deci cannot say directly is said exactly:

- a layer whose MLP was removed keeps one zero-weight channel (``feed_forward_length`` 1): in the
  llama.cpp this targets (b11434), a layer of length 0 skips the rest of the layer, its attention's
  residual add included;
- a layer whose attention was removed gets 0 heads (deci skips its attention), except layer 0,
  which keeps one head with a zero output projection: llama.cpp reads the head size from layer 0;
- o_proj / down_proj biases (bias compensation) are deci's optional ``attn_output.bias`` /
  ``ffn_down.bias``, Qwen2's q/k/v biases its optional ``attn_q/k/v.bias``.

Query and key rows go from Hugging Face's half-split RoPE to llama.cpp's pairwise one
(:func:`rope_permute`), per layer at its own head counts. Matrices are stored in the chosen type
(q8_0 where a row is a multiple of 32 values, f16 otherwise, as llama.cpp's converter does),
vectors in f32. The vocabulary is the export's byte-level BPE ``tokenizer.json``; its pre-tokenizer
name is the source GGUF's when the export came from one, else read from the tokenizer's structure.
:func:`plan_gguf` checks everything a user can get wrong before :func:`write_gguf` writes a tensor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from space.adapters import family
from space.errors import UserError
from space.export.atomic import replace_file
from space.export.folder import read_subnet_record

log = logging.getLogger(__name__)
ARCH = "deci"
FAMILIES = ("llama", "mistral", "qwen2")
Q = gguf.GGMLQuantizationType
TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
         "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
ATTENTION_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"}
MLP_NAMES = {"post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
# Split regexes of tokenizer.json -> llama.cpp's pre-tokenizer names.
SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


@dataclass
class LayerPlan:
    """One decoder layer as written: head counts and MLP width in the file, and what is kept."""
    heads: int
    kv_heads: int
    channels: int
    attention: bool  # the export has this layer's attention
    mlp: bool


@dataclass
class GGUFPlan:
    """What :func:`write_gguf` writes, checked: the export's config, tensor files and layers."""
    folder: Path
    config: dict
    head_dim: int
    files: dict[str, Path]  # tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]]
    layers: list[LayerPlan]
    pre_tokenizer: str
    rope: dict = field(default_factory=dict)


def rope_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from half-split RoPE pairs (i, i + d/2) to adjacent
    pairs (2i, 2i + 1), head by head: what llama.cpp's normal RoPE rotates."""
    if n_heads == 0:
        return weight
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _tensor_index(folder: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    files, shapes = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                files[key], shapes[key] = path, tuple(f.get_slice(key).get_shape())
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights")
    return files, shapes


def _check_family(config: dict) -> None:
    name = family(config.get("model_type", ""))
    if name not in FAMILIES:
        raise UserError(f"model type {config.get('model_type')!r}: llama.cpp's deci architecture is a plain Llama "
                        f"block, so only {', '.join(FAMILIES)} exports are written as GGUF (the others have q/k "
                        "norms, extra norms or soft-capping that deci cannot express)")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"activation {config['hidden_act']!r}: llama.cpp's deci MLP is SiLU-gated")
    window = config.get("sliding_window") if config.get("use_sliding_window", name == "mistral") else None
    if window and window < config.get("max_position_embeddings", 0):
        log.warning("sliding-window attention (%d tokens) is not in llama.cpp's deci: contexts longer than the "
                    "window attend further than in transformers", window)


def _rope(config: dict) -> dict:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"RoPE type {kind!r} is not written to GGUF here (default, linear and llama3 are)")
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return {**params, "rope_type": kind}


def _layer(shapes: dict, head_dim: int, index: int) -> LayerPlan:
    base = f"model.layers.{index}."
    rows = {name: shapes.get(f"{base}{name}.weight", (0,))[0] for name in ATTENTION_NAMES if "proj" in name}
    heads, kv_heads = rows["self_attn.q_proj"] // head_dim, rows["self_attn.k_proj"] // head_dim
    channels = shapes.get(f"{base}mlp.gate_proj.weight", (0,))[0]
    if (heads == 0) != (kv_heads == 0) or (kv_heads and heads % kv_heads):
        raise UserError(f"layer {index}: {heads} query heads cannot share {kv_heads} key/value heads")
    attention, mlp = heads > 0, channels > 0
    if not attention and index == 0:
        heads = kv_heads = 1  # one head with a zero output projection (see the module docstring)
    return LayerPlan(heads, kv_heads, max(channels, 1), attention, mlp)


def _used_keys(plan: GGUFPlan) -> set[str]:
    used = {k for k in GLOBAL_NAMES if k in plan.files}
    for i, layer in enumerate(plan.layers):
        parts = [*(ATTENTION_NAMES if layer.attention else ()), *(MLP_NAMES if layer.mlp else ())]
        used |= {f"model.layers.{i}.{p}.{kind}" for p in parts for kind in ("weight", "bias")}
        if not layer.attention:  # its input norm has nothing to normalise for
            used.add(f"model.layers.{i}.input_layernorm.weight")
        used.add(f"model.layers.{i}.post_attention_layernorm.weight")
    return used


def plan_gguf(folder: Path) -> GGUFPlan:
    """Read and check an export folder (config, tensor names and shapes, tokenizer): every problem
    a user can cause is a :class:`UserError` raised here, before any weight is read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    record = read_subnet_record(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _check_family(config)
    files, shapes = _tensor_index(folder)
    if not config.get("tie_word_embeddings", True) and "lm_head.weight" not in files:
        raise UserError(f"{folder}: the output head is not tied to the embeddings and lm_head.weight is missing")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers = [_layer(shapes, head_dim, i) for i in range(config["num_hidden_layers"])]
    plan = GGUFPlan(folder, config, head_dim, files, shapes, layers, _pre_tokenizer(folder, record), _rope(config))
    unknown = sorted(set(files) - _used_keys(plan))
    if unknown:
        raise UserError(f"tensors llama.cpp's deci architecture has no place for: {', '.join(unknown[:5])}")
    return plan


def _pre_tokenizer(folder: Path, record: dict) -> str:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json: export with the tokenizer (a GGUF carries its vocabulary)")
    data = json.loads(path.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if data.get("model", {}).get("type") != "BPE" or "ByteLevel" not in kinds:
        raise UserError("only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 style) are written to GGUF "
                        f"here; this one is {data.get('model', {}).get('type')} with {kinds or 'no'} pre-tokenizer")
    source = record.get("source") or {}
    if source.get("kind") == "gguf" and Path(source.get("path", "")).is_file():
        field_ = gguf.GGUFReader(source["path"]).fields.get("tokenizer.ggml.pre")
        if field_ is not None:
            return field_.contents()
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") in SPLIT_PRE:
        return SPLIT_PRE[parts[0]["pattern"]["Regex"]]
    raise UserError(f"pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp is known to name")


def _add_tokenizer(writer: gguf.GGUFWriter, plan: GGUFPlan, n_vocab: int) -> None:
    data = json.loads((plan.folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    entries = [(tok, i, gguf.TokenType.NORMAL) for tok, i in data["model"]["vocab"].items()]
    entries += [(t["content"], t["id"], gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
                for t in data.get("added_tokens", [])]
    for token, i, kind in entries:
        if i >= n_vocab:
            raise UserError(f"token {token!r} has id {i}, beyond the {n_vocab} rows of the embedding")
        tokens[i], types[i] = token, kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(plan.folder, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # say it: llama.cpp's default depends on the pre-tokenizer
        writer.add_add_bos_token(False)


def _add_hparams(writer: gguf.GGUFWriter, plan: GGUFPlan, file_type: int, n_vocab: int) -> None:
    c = plan.config
    writer.add_name(str(c.get("_model_name_or_path") or c.get("_name_or_path") or plan.folder.name))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_block_count(len(plan.layers))
    writer.add_context_length(c.get("max_position_embeddings", 2048))
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length([layer.channels for layer in plan.layers])
    writer.add_head_count([layer.heads for layer in plan.layers])
    writer.add_head_count_kv([layer.kv_heads for layer in plan.layers])
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(float(plan.rope["rope_theta"]))
    if plan.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(plan.rope["factor"]))


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's per-frequency RoPE divisors (llama.cpp's ``rope_freqs``)."""
    freqs = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, old = rope.get("factor", 8.0), rope.get("original_max_position_embeddings", 8192)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / freqs
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    factors = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, factor, factors)).float()


def _reader(plan: GGUFPlan, key: str, permute_heads: int = 0) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        with safe_open(plan.files[key], "pt") as f:
            return rope_permute(f.get_tensor(key).float(), permute_heads)
    return read


def _layer_tensors(plan: GGUFPlan, i: int) -> list[tuple[str, tuple[int, ...], Callable]]:
    layer, hidden, base = plan.layers[i], plan.config["hidden_size"], f"model.layers.{i}."
    out = []
    present = [(ATTENTION_NAMES, layer.attention), (MLP_NAMES, layer.mlp)]
    for names, kept in present:
        for part, name in names.items() if kept else ():
            for kind in ("weight", "bias"):
                key = f"{base}{part}.{kind}"
                heads = {"attn_q": layer.heads, "attn_k": layer.kv_heads}.get(name, 0)
                if key in plan.files:
                    out.append((f"blk.{i}.{name}.{kind}", plan.shapes[key], _reader(plan, key, heads)))
    dummies = []
    if not layer.attention and layer.heads:  # layer 0: one head, zero output
        q, kv = layer.heads * plan.head_dim, layer.kv_heads * plan.head_dim
        dummies += [("attn_norm", (hidden,)), ("attn_q", (q, hidden)), ("attn_k", (kv, hidden)),
                    ("attn_v", (kv, hidden)), ("attn_output", (hidden, q))]
    if not layer.mlp:  # one channel, zero weights
        dummies += [("ffn_gate", (1, hidden)), ("ffn_up", (1, hidden)), ("ffn_down", (hidden, 1)),
                    ("ffn_norm", (hidden,))]
    for name, shape in dummies:
        source = f"{base}{'input_layernorm' if name == 'attn_norm' else 'post_attention_layernorm'}.weight"
        if len(shape) == 1 and source in plan.files:
            out.append((f"blk.{i}.{name}.weight", shape, _reader(plan, source)))
        else:
            out.append((f"blk.{i}.{name}.weight", shape, lambda s=shape: torch.ones(s) if len(s) == 1 else
                        torch.zeros(s)))
    return out


def tensor_plan(plan: GGUFPlan) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(GGUF name, shape in torch order, reader) of every tensor the file holds, in file order."""
    out = [(name, plan.shapes[key], _reader(plan, key)) for key, name in GLOBAL_NAMES.items() if key in plan.files]
    if plan.rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(plan.rope, plan.head_dim)
        out.append(("rope_freqs.weight", tuple(factors.shape), lambda: factors))
    for i in range(len(plan.layers)):
        out += _layer_tensors(plan, i)
    return out


def storage_type(shape: tuple[int, ...], kind: str) -> gguf.GGMLQuantizationType:
    """The GGUF type of a tensor of ``shape`` in a file of type ``kind``: vectors stay f32."""
    qtype = TYPES[kind][0]
    if len(shape) == 1:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def write_gguf(plan: GGUFPlan, out: Path, kind: str = "f16") -> Path:
    """Write the GGUF file of a planned export, one tensor in memory at a time, renamed into place
    when complete."""
    if kind not in TYPES:
        raise UserError(f"unknown GGUF type {kind!r}; choose one of {', '.join(TYPES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = tensor_plan(plan)
    n_vocab = plan.shapes["model.embed_tokens.weight"][0]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _add_hparams(writer, plan, TYPES[kind][1], n_vocab)
        _add_tokenizer(writer, plan, n_vocab)
        for name, shape, _ in tensors:
            qtype = storage_type(shape, kind)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) // block * size, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, read in tensors:
            writer.write_tensor_data(gguf.quants.quantize(read().numpy(), storage_type(shape, kind)))
        writer.close()

    replace_file(out, write)
    return out
