"""Small hand-written zero-shot task files with the quirks of our copies (tests of the harness and of
the scripts that report zero-shot scores)."""

from __future__ import annotations

import json
from pathlib import Path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tiny_zeroshot_data(root: Path) -> None:
    """Two or three questions of each local zero-shot task under ``root`` (an $LLM_PRUNER_DATA folder), in
    the layout and with the quirks of our copies."""
    choice = lambda label, text: {"label": label, "text": text}  # noqa: E731
    _jsonl(root / "arc/ARC-Easy-Test.jsonl", [
        {"id": "num3", "question": {"stem": "Pick three?", "choices": [choice("1", "one"), choice("2", "two"),
                                                                       choice("3", "three")]}, "answerKey": "3"},
        {"id": "let5", "question": {"stem": "Pick E?", "choices": [choice(k, k.lower()) for k in "ABCDE"]},
         "answerKey": "E"},
    ])
    _jsonl(root / "arc/ARC-Challenge-Test.jsonl", [
        {"id": "c1", "question": {"stem": "Pick two?", "choices": [choice("A", "one"), choice("B", "two")]},
         "answerKey": "B"},
    ])
    _jsonl(root / "boolq/val.jsonl", [
        {"question": "is it", "passage": "T -- p", "idx": 0, "label": "true"},
        {"question": "is it", "passage": "T -- p", "idx": 1, "label": "false"},
        {"question": "is it", "passage": "T -- p", "idx": 2, "label": True},
    ])
    _jsonl(root / "winogrande/winogrande_xl_validation.jsonl", [
        {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "Sarah beat Maria so _ lost.", "option1": "Sarah", "option2": "Maria", "answer": "2"},
    ])
    _jsonl(root / "openbookqa/test.jsonl", [
        {"id": "1", "question_stem": "Fog is near", "answerKey": " B",
         "choices": {"text": ["a desert", "a marsh", "plains", "space"], "label": ["A", "B", "C", "D"]}},
    ])
    _jsonl(root / "hellaswag/hellaswag_val.jsonl", [
        {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean. [title] Get soap.",
         "ctx_b": "", "ctx": "[header] How to clean. [title] Get soap.", "endings": ["Rinse  it [step] well.",
                                                                                     "Dry it."], "label": "1"},
        {"ind": 5, "activity_label": "Clean and jerk", "ctx_a": "A lady walks.", "ctx_b": "THE lady",
         "ctx": "A lady walks. THE lady", "endings": ["a", "b"], "label": "0"},
    ])
    _jsonl(root / "piqa/valid.jsonl", [{"goal": "dresser", "sol1": "pin ", "sol2": "nail"},
                                        {"goal": "door", "sol1": "open", "sol2": "shut"}])
    (root / "piqa/valid-labels.lst").write_text("1\n0\n")
