"""Calibration data of the user's own: ``hf:`` specs on save_to_disk folders, a ``datasets.Dataset``
handed to the Python API, the chat template, and too little text."""

import json

import pytest
import torch
from datasets import Dataset, DatasetDict

from evaluators.data import CalibrationSpec, check_calibration, source_tokens
from space.errors import UserError
from tests.conftest import tiny_tokenizer

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"


def documents(count: int = 20, offset: int = 0) -> list[str]:
    return [" ".join(f"w{(i * 7 + j + offset) % 100}" for j in range(20)) for i in range(count)]


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_an_hf_folder_reads_like_the_same_records_in_jsonl(tiny_data, tmp_path):
    tokenizer = tiny_tokenizer()
    Dataset.from_dict({"text": documents(), "id": list(range(20))}).save_to_disk(tmp_path / "one")
    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
    folder = CalibrationSpec(f"hf:{tmp_path / 'one'}:text", 4, 16, 0)
    jsonl = CalibrationSpec(f"{tmp_path / 'same.jsonl'}:text", 4, 16, 0)
    assert torch.equal(folder.windows(tokenizer), jsonl.windows(tokenizer))
    record = folder.to_dict()
    assert record["dataset"] == "hf" and record["split"] == f"{tmp_path / 'one'}:text"
    assert CalibrationSpec.from_dict(record).to_dict() == record and list(record["files"]) == [folder.parts()[0]]
    Dataset.from_dict({"text": documents(offset=1), "id": list(range(20))}).save_to_disk(tmp_path / "one")
    assert folder.to_dict()["files"] != record["files"]  # other data: another cache key


def test_an_hf_folder_of_splits_needs_a_split_and_never_a_test_one(tiny_data, tmp_path):
    tokenizer = tiny_tokenizer()
    splits = DatasetDict({"train": Dataset.from_dict({"text": documents()}),
                          "test": Dataset.from_dict({"text": documents(offset=3)})})
    splits.save_to_disk(tmp_path / "splits")
    assert CalibrationSpec(f"hf:{tmp_path / 'splits'}:train:text", 2, 16).windows(tokenizer).shape == (2, 16)
    cases = [(f"hf:{tmp_path / 'splits'}:test:text", "leak"),
             (f"hf:{tmp_path / 'splits'}:test[:5]:text", "leak"),
             (f"hf:{tmp_path / 'splits'}:text", "holds the splits train, test: write hf:.*:SPLIT:text"),
             (f"hf:{tmp_path / 'splits'}:train:body", "has no field 'body'; it has text"),
             (f"hf:{tmp_path / 'missing'}:train:text", "folder not found"),
             ("hf:someone/data:text", "hf:NAME[:CONFIG]:SPLIT:FIELD")]
    for spec, message in cases:
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            CalibrationSpec(spec, 2, 16).windows(tokenizer)


def test_a_hub_name_goes_to_load_dataset(tiny_data, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, *config, split):
        calls.append((name, config, split))
        if name == "someone/absent":
            raise ConnectionError("Couldn't reach 'someone/absent' on the Hub")
        return Dataset.from_dict({"body": documents()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = CalibrationSpec("hf:someone/data:cfg:train[:80%]:body", 2, 16)
    assert spec.windows(tiny_tokenizer()).shape == (2, 16)
    assert calls[-1] == ("someone/data", ("cfg",), "train[:80%]")
    assert spec.to_dict()["split"] == "someone/data:cfg:train[:80%]:body" and "files" not in spec.to_dict()
    CalibrationSpec("hf:someone/data:validation:body", 2, 16).windows(tiny_tokenizer())
    assert calls[-1] == ("someone/data", (), "validation")
    with pytest.raises(UserError, match="could not open 'someone/absent' .*ConnectionError"):
        CalibrationSpec("hf:someone/absent:train:text", 2, 16).windows(tiny_tokenizer())


def test_a_dataset_object_calibrates_and_is_recorded_by_its_content(tiny_data, tmp_path):
    tokenizer = tiny_tokenizer()
    data = Dataset.from_dict({"text": documents(), "id": list(range(20))})
    data.save_to_disk(tmp_path / "one")
    spec = CalibrationSpec(data, 4, 16, 0)
    assert torch.equal(spec.windows(tokenizer), CalibrationSpec(f"hf:{tmp_path / 'one'}:text", 4, 16, 0).windows(tokenizer))
    record = spec.to_dict()
    assert record["dataset"] == "memory" and record["split"].endswith(":text")
    assert CalibrationSpec.from_dict(record) == spec
    assert CalibrationSpec(Dataset.from_dict({"text": documents()}), 4, 16).to_dict() == record  # same text
    assert CalibrationSpec(Dataset.from_dict({"text": documents(offset=1)}), 4, 16).to_dict() != record
    with pytest.raises(UserError, match="a 'text' column or one column"):
        CalibrationSpec(Dataset.from_dict({"a": ["x"], "b": ["y"]}))
    with pytest.raises(UserError, match="leak"):
        CalibrationSpec(Dataset.from_dict({"text": documents()}, split="test"))
    with pytest.raises(UserError, match=r"not a DatasetDict \(a DatasetDict: pick a split"):
        CalibrationSpec(DatasetDict({"train": data}))


def test_the_python_api_prunes_on_a_dataset_object(tiny_data):
    from search import prune
    from tests.conftest import tiny_model

    tokenizer, data = tiny_tokenizer(), Dataset.from_dict({"text": documents(60)})
    pruned = prune(tiny_model("llama"), tokenizer=tokenizer, ratio=0.7, calibration=data)
    calibration = pruned.record["recipe"]["calibration"]
    assert calibration["dataset"] == "memory" and calibration == CalibrationSpec(data).to_dict()
    assert abs(pruned.subnet.ratio() - 0.7) < 0.02


def test_the_chat_template_wraps_every_document(tiny_data, tmp_path):
    tokenizer = chat_tokenizer()
    markers = {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>")}
    (tmp_path / "notes.txt").write_text("\n\n".join(documents()))
    plain = source_tokens(tokenizer, str(tmp_path / "notes.txt"))
    wrapped = source_tokens(tokenizer, str(tmp_path / "notes.txt"), chat_template=True)
    assert not set(plain.tolist()) & markers
    assert wrapped.tolist().count(tokenizer.convert_tokens_to_ids("<|user|>")) == 20  # one user turn a paragraph
    assert [t for t in wrapped.tolist() if t not in markers] == plain.tolist()  # the same words, wrapped
    chats = [[{"role": "user", "content": d}, {"role": "assistant", "content": "w1 w2"}] for d in documents(4)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    conversation = source_tokens(tokenizer, f"{tmp_path / 'chats.jsonl'}:messages", chat_template=True).tolist()
    assert conversation.count(tokenizer.convert_tokens_to_ids("<|assistant|>")) == 4  # the conversations as they are
    spec = CalibrationSpec(str(tmp_path / "notes.txt"), 4, 16, 0, chat_template=True)
    assert not torch.equal(spec.windows(tokenizer), CalibrationSpec(str(tmp_path / "notes.txt"), 4, 16, 0).windows(tokenizer))
    again = CalibrationSpec.from_dict(spec.to_dict())
    assert spec.to_dict()["chat_template"] is True and again.chat_template and again.to_dict() == spec.to_dict()
    assert "chat_template" not in CalibrationSpec(str(tmp_path / "notes.txt"), 4, 16).to_dict()  # records as before
    with pytest.raises(UserError, match="no chat template"):
        check_calibration([spec], tiny_tokenizer())


def test_too_little_text_is_one_message_with_the_token_counts(tiny_data, tmp_path):
    tokenizer = tiny_tokenizer()
    (tmp_path / "short.txt").write_text(" ".join(documents(5)))  # 100 tokens
    statistics = CalibrationSpec(f"wikitext2+{tmp_path / 'short.txt'}", 4, 64, 0, (0.0, 0.6))
    fitness = CalibrationSpec(str(tmp_path / "short.txt"), 4, 32, 1, (0.6, 0.8))
    with pytest.raises(UserError) as error:
        check_calibration([statistics, fitness], tokenizer)
    message = str(error.value)
    assert message.startswith("too little calibration text: ") and message.count("short.txt has 100 tokens") == 2
    assert "windows of 64 tokens from 60% of its tokens (region 0-0.6) need at least 109" in message
    assert "windows of 32 tokens from 20% of its tokens (region 0.6-0.8) need at least 163" in message
    with pytest.raises(UserError, match="short.txt has 100 tokens; windows of 64 tokens"):
        statistics.windows(tokenizer)
    check_calibration([CalibrationSpec(str(tmp_path / "short.txt"), 4, 16, 0, (0.0, 0.6))], tokenizer)  # enough
