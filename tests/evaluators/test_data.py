import json

import pytest
import torch

from evaluators.data import (
    CalibrationSpec,
    eval_windows,
    load_text,
    parse_dataset,
    random_windows,
)
from evaluators.texts import _wikitext_rows
from space.errors import UserError


def test_eval_windows_are_non_overlapping_from_the_start():
    tokens = torch.arange(100)
    windows = eval_windows(tokens, seqlen=30)
    assert windows.shape == (3, 30)
    assert torch.equal(windows.reshape(-1), torch.arange(90))
    assert eval_windows(tokens, seqlen=30, limit=2).shape == (2, 30)


def test_text_shorter_than_a_window_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(torch.arange(10), seqlen=30)


def test_random_windows_are_deterministic_by_seed():
    tokens = torch.arange(1000)
    a = random_windows(tokens, nsamples=4, seqlen=16, seed=3)
    assert torch.equal(a, random_windows(tokens, nsamples=4, seqlen=16, seed=3))
    assert not torch.equal(a, random_windows(tokens, nsamples=4, seqlen=16, seed=4))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous slices of the text


def test_windows_without_a_seed_are_evenly_spaced_and_tile_a_text_they_fit():
    tokens, region = torch.arange(1000), (0.2, 0.4)  # tokens 200-399
    spread = random_windows(tokens, nsamples=4, seqlen=16, seed=None, region=region)
    assert torch.equal(spread, random_windows(tokens, nsamples=4, seqlen=16, seed=None, region=region))
    starts, drawn = spread[:, 0], random_windows(tokens, nsamples=64, seqlen=16, seed=0, region=region)[:, 0]
    assert starts.min() == 200 and drawn.max() <= starts.max() == 400 - 16 - 1  # the range a draw's starts span
    assert (starts.diff() - starts.diff()[0]).abs().max() <= 1 and starts.diff().min() > 16  # even, apart
    # as many windows as fit: one after the other (a draw's range leaves out the text's last token)
    tiled = random_windows(torch.arange(12 * 16 + 1), nsamples=12, seqlen=16, seed=None)
    assert torch.equal(tiled.reshape(-1), torch.arange(12 * 16))


def test_names_and_splits_are_checked():
    assert parse_dataset("WikiText-2") == ("wikitext2", None)
    assert parse_dataset("c4:train") == ("c4", "train")
    with pytest.raises(UserError, match="unknown dataset"):
        parse_dataset("imagenet")
    with pytest.raises(UserError, match="no split"):
        parse_dataset("ptb:dev")


def test_calibration_never_uses_a_test_split(tiny_data):
    with pytest.raises(UserError, match="leak"):
        CalibrationSpec("wikitext2:test").windows(None)
    with pytest.raises(UserError, match="leak"):
        CalibrationSpec("c4:heldout").windows(None)
    assert CalibrationSpec("c4").to_dict()["split"] == "calib"


def test_c4_sample_splits_into_calibration_and_held_out_documents(tmp_path, monkeypatch):
    folder = tmp_path / "c4"
    folder.mkdir()
    docs = [{"text": f"document {i}", "url": "", "timestamp": ""} for i in range(1000)]
    (folder / "c4-train.00000-of-01024.first1000.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    calib, heldout = load_text("c4", "calib"), load_text("c4", "heldout")
    assert calib.startswith("document 0 ") and calib.endswith("document 499")
    assert heldout.startswith("document 500 ") and heldout.endswith("document 999")
    assert load_text("c4", "train") == calib + " " + heldout


def test_missing_local_file_without_network_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    with pytest.raises(UserError, match="not found locally"):
        load_text("ptb", "test")
    with pytest.raises(UserError, match="not found"):
        load_text("c4", "validation")


@pytest.mark.real
def test_wikitext_rows_match_the_hub_rows(real_data):
    # The hub's wikitext-2-raw-v1 test split: 4358 rows, 1305088 bytes counting 4 per row
    # (the dataset card's num_bytes; shared/data/MANIFEST.md).
    raw = (real_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = _wikitext_rows(raw)
    assert len(rows) == 4358
    assert sum(len(r.encode()) for r in rows) + 4 * len(rows) == 1305088
    text = load_text("wikitext2", "test")
    assert text.startswith("\n\n = Robert Boulter = \n")


@pytest.mark.real
def test_every_shipped_text_dataset_loads(real_data):
    for name, split in (("wikitext2", "validation"), ("ptb", "test"), ("ptb", "validation"), ("c4", "train")):
        assert len(load_text(name, split)) > 300_000
    assert len(load_text("c4", "calib")) > 300_000 and len(load_text("c4", "heldout")) > 300_000



def test_calibration_from_a_text_file_or_a_jsonl_field(tiny_data, tmp_path):
    from evaluators.data import calibration_windows
    from space.errors import UserError
    from tests.conftest import tiny_tokenizer

    words = " ".join(f"w{i % 50}" for i in range(400))
    (tmp_path / "mine.txt").write_text(words)
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps({"text": words[i:i + 200], "id": i})
                                                   for i in range(0, len(words), 200)) + "\n")
    tokenizer = tiny_tokenizer()
    text = CalibrationSpec(str(tmp_path / "mine.txt"), 4, 16, 0)
    jsonl = CalibrationSpec(f"{tmp_path / 'mine.jsonl'}:text", 4, 16, 0)
    assert text.windows(tokenizer).shape == (4, 16) and jsonl.windows(tokenizer).shape == (4, 16)
    record = jsonl.to_dict()
    assert record["dataset"] == "file" and record["split"] == f"{tmp_path / 'mine.jsonl'}:text"
    assert CalibrationSpec.from_dict(record).to_dict() == record and len(record["files"]) == 1
    mixed = CalibrationSpec(f"wikitext2+{tmp_path / 'mine.txt'}", 4, 16, 0, (0.0, 0.6))
    assert mixed.windows(tokenizer).shape == (4, 16) and not mixed.overlaps(CalibrationSpec("wikitext2", 4, 16, 0, (0.6, 1)))
    before = text.to_dict()["files"]
    (tmp_path / "mine.txt").write_text(words + " w1")
    assert text.to_dict()["files"] != before  # edited: other data for every cache and resume check
    with pytest.raises(UserError, match="not found"):
        CalibrationSpec(str(tmp_path / "missing.txt"), 4, 16)
    with pytest.raises(UserError, match="name its text field"):
        CalibrationSpec(str(tmp_path / "mine.jsonl"), 4, 16)
    with pytest.raises(UserError, match="has no field 'body'"):
        CalibrationSpec(f"{tmp_path / 'mine.jsonl'}:body", 4, 16).windows(tokenizer)
    with pytest.raises(UserError, match="too little calibration text: .* has 401 tokens; windows of 4096"):
        calibration_windows(tokenizer, str(tmp_path / "mine.txt"), nsamples=2, seqlen=4096)
