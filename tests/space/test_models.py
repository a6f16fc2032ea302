
import pytest
import torch

from space.errors import UserError
from space.models import load_model, resolve


def test_resolve_tells_folders_files_hub_ids_and_aliases_apart(tiny_model_dir, tmp_path):
    assert resolve(str(tiny_model_dir)).kind == "folder"
    assert resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="model not found"):
        resolve(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(UserError, match="model file not found"):
        resolve(str(tmp_path / "missing.gguf"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(path))


def test_a_corrupt_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match="GGUF"):
        load_model(str(path))


def test_folder_loads_in_the_asked_dtype(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert not loaded.model.training


@pytest.mark.real
def test_a_truncated_gguf_is_refused(tmp_path):
    source = resolve("smollm2-135m").path
    path = tmp_path / "cut.gguf"
    with open(source, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(20_000_000))
    with pytest.raises(UserError, match="truncated"):
        load_model(str(path))


@pytest.mark.real
def test_the_alias_loads_smollm2(real_model):
    config = real_model.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (30, 576, 9, 3, 1536)
    assert sum(p.numel() for p in real_model.model.parameters()) == 134_515_008
    assert real_model.source.kind == "gguf" and real_model.source.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
