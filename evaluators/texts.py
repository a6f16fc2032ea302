"""The built-in text datasets (``wikitext2``, ``ptb``, ``c4``): where each split lives under
``$LLM_PRUNER_DATA``, how its rows become one text (exactly as the hub's loaders and the pruning
papers join them) and its documents (what ``--chat-template`` wraps), and how the hub provides a
split that has no local file. Read through :mod:`evaluators.data`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# --- how each dataset's rows become one text --------------------------------------------------


def _wikitext_rows(raw: str) -> list[str]:
    # The raw file has one paragraph per line and " " for blank lines; the hub's rows keep the
    # newline of non-empty lines and turn blank lines into "" (see shared/data/MANIFEST.md).
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def _read_wikitext(path: Path, split: str) -> str:
    return "\n\n".join(_wikitext_rows(path.read_text(encoding="utf-8")))


def _ptb_sentences(path: Path, split: str) -> list[str]:
    # ptb_text_only: sentence = line.strip()
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _read_ptb(path: Path, split: str) -> str:
    return " ".join(_ptb_sentences(path, split))  # the pruning papers join sentences with one space


# The local C4 sample (the first 1000 documents of the train shard the papers calibrate on) in named
# parts: ``calib`` to calibrate on, ``heldout`` to measure on text no step fitted.
C4_DOCUMENTS = {"train": (0, 1000), "calib": (0, 500), "heldout": (500, 1000)}


def _c4_documents(path: Path, split: str) -> list[str]:
    first, last = C4_DOCUMENTS[split]
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f if line.strip()]
    return rows[first:last]


def _read_c4(path: Path, split: str) -> str:
    return " ".join(_c4_documents(path, split))


def paragraphs(text: str) -> list[str]:
    """The documents of a text without records: its paragraphs (split at blank lines), or its
    lines when it has no blank line."""
    parts = re.split(r"\n[ \t]*\n", text) if re.search(r"\n[ \t]*\n", text) else text.splitlines()
    return [part.strip() for part in parts if part.strip()]


@dataclass(frozen=True)
class TextDataset:
    name: str
    local: dict[str, str]  # split -> path under $LLM_PRUNER_DATA
    read_local: Callable[[Path, str], str]  # (path, split) -> text
    hub: dict[str, Callable[[], str]]  # split -> loader through `datasets`
    eval_split: str
    documents: Callable[[Path, str], list[str]] | None = None  # (path, split) -> documents; None: paragraphs

    def local_documents(self, path: Path, split: str) -> list[str]:
        """The documents of a split's local file (what ``--chat-template`` wraps one by one)."""
        if self.documents is None:
            return paragraphs(self.read_local(path, split))
        return [doc for doc in self.documents(path, split) if doc.strip()]


def _hub_wikitext(split: str) -> Callable[[], str]:
    def load() -> str:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return "\n\n".join(rows)

    return load


def _hub_ptb(split: str) -> Callable[[], str]:
    def load() -> str:
        import datasets

        rows = datasets.load_dataset("ptb-text-only/ptb_text_only", split=split)["sentence"]
        return " ".join(rows)

    return load


def _hub_c4(split: str, shard: str, first: int) -> Callable[[], str]:
    def load() -> str:
        import datasets

        rows = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return " ".join(rows.select(range(min(first, len(rows))))["text"])

    return load


DATASETS: dict[str, TextDataset] = {
    "wikitext2": TextDataset(
        name="wikitext2",
        local={
            "test": "wikitext-2-raw-v1/wiki.test.raw",
            "validation": "wikitext-2-raw-v1/wiki.valid.raw",
            "train": "wikitext-2-raw-v1/wiki.train.raw",
        },
        read_local=_read_wikitext,
        hub={s: _hub_wikitext(s) for s in ("test", "validation", "train")},
        eval_split="test",
    ),
    "ptb": TextDataset(
        name="ptb",
        local={
            "test": "ptb/ptb.test.txt",
            "validation": "ptb/ptb.valid.txt",
            "train": "ptb/ptb.train.txt",
        },
        read_local=_read_ptb,
        hub={s: _hub_ptb(s) for s in ("test", "validation", "train")},
        eval_split="test",
        documents=_ptb_sentences,
    ),
    "c4": TextDataset(
        name="c4",
        # Only a sample of the train shard the papers calibrate on ships locally; the papers'
        # C4 perplexity uses the first 1100 documents of the first validation shard.
        local={split: "c4/c4-train.00000-of-01024.first1000.jsonl" for split in C4_DOCUMENTS},
        read_local=_read_c4,
        hub={
            "train": _hub_c4("train", "en/c4-train.00000-of-01024.json.gz", 1000),
            "validation": _hub_c4("validation", "en/c4-validation.00000-of-00008.json.gz", 1100),
        },
        eval_split="validation",
        documents=_c4_documents,
    ),
}

ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wiki": "wikitext2"}
