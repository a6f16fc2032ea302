"""Text datasets for calibration and perplexity: resolved to local files first, then to the hub.

A dataset name (``wikitext2``, ``ptb``, ``c4``) and a split resolve to a file under
``$LLM_PRUNER_DATA`` (the layout of the project's ``shared/data`` folder); only when no local
file exists is the Hugging Face hub asked, through ``datasets``. Local files are read directly:
they are small, and reading them exactly as the hub's loaders would (row joining included) is
what keeps numbers comparable with the papers.

Tokenised text is cut into windows: non-overlapping ones for evaluation, seeded random ones for
calibration (deterministic for a given seed), which may also come from files (:mod:`evaluators.sources`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from evaluators.sources import FILE_SOURCE, file_source, file_text, fingerprint
from space.errors import UserError

DATA_ENV = "LLM_PRUNER_DATA"


def data_root() -> Path | None:
    """The local data folder named by ``$LLM_PRUNER_DATA``, or None when unset."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def local_file(relative: str) -> Path | None:
    """``$LLM_PRUNER_DATA/<relative>`` if it exists, else None."""
    root = data_root()
    if root is None:
        return None
    path = root / relative
    return path if path.is_file() else None


# --- how each dataset's rows become one text --------------------------------------------------


def _wikitext_rows(raw: str) -> list[str]:
    # The raw file has one paragraph per line and " " for blank lines; the hub's rows keep the
    # newline of non-empty lines and turn blank lines into "" (see shared/data/MANIFEST.md).
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def _read_wikitext(path: Path, split: str) -> str:
    return "\n\n".join(_wikitext_rows(path.read_text(encoding="utf-8")))


def _read_ptb(path: Path, split: str) -> str:
    # ptb_text_only: sentence = line.strip(); the pruning papers join sentences with one space.
    return " ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines())


# The local C4 sample (the first 1000 documents of the train shard the papers calibrate on) in named
# parts: ``calib`` to calibrate on, ``heldout`` to measure on text no step fitted.
C4_DOCUMENTS = {"train": (0, 1000), "calib": (0, 500), "heldout": (500, 1000)}


def _read_c4(path: Path, split: str) -> str:
    first, last = C4_DOCUMENTS[split]
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f if line.strip()]
    return " ".join(rows[first:last])


@dataclass(frozen=True)
class TextDataset:
    name: str
    local: dict[str, str]  # split -> path under $LLM_PRUNER_DATA
    read_local: Callable[[Path, str], str]  # (path, split) -> text
    hub: dict[str, Callable[[], str]]  # split -> loader through `datasets`
    eval_split: str


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
    ),
}

ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wiki": "wikitext2"}


def parse_dataset(spec: str) -> tuple[str, str | None]:
    """``"wikitext2"`` -> (wikitext2, None); ``"c4:train"`` -> (c4, train). Unknown names raise."""
    name, _, split = spec.strip().partition(":")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise UserError(f"unknown dataset {spec!r}; known: {', '.join(sorted(DATASETS))}")
    dataset = DATASETS[name]
    if split and split not in set(dataset.local) | set(dataset.hub):
        known = ", ".join(sorted(set(dataset.local) | set(dataset.hub)))
        raise UserError(f"dataset {name!r} has no split {split!r}; known: {known}")
    return name, split or None


def load_text(name: str, split: str) -> str:
    """The whole text of one split, from ``$LLM_PRUNER_DATA`` if there, else from the hub."""
    dataset = DATASETS[parse_dataset(name)[0]]
    relative = dataset.local.get(split)
    path = local_file(relative) if relative else None
    if path is not None:
        return dataset.read_local(path, split)
    where = f"$LLM_PRUNER_DATA/{relative}" if relative else "no local copy of this split exists"
    if split not in dataset.hub:
        raise UserError(f"dataset {dataset.name}:{split}: not found ({where})")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(f"dataset {dataset.name}:{split}: not found locally ({where}) and the hub is offline")
    try:
        return dataset.hub[split]()
    except Exception as exc:  # datasets raises many types for "no network" / "no such repo"
        raise UserError(
            f"dataset {dataset.name}:{split}: not found locally ({where}) and the hub could not "
            f"provide it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


HELD_OUT_SPLITS = ("test", "heldout")  # never calibrated on


def default_calibration_split(name: str) -> str:
    """The split calibration reads when none is named: C4's ``calib`` part of the local sample
    (no local validation text ships; ``heldout`` is the other part), the validation split of the
    others; never a test split."""
    return "calib" if name == "c4" else "validation"


def source_part(part: str) -> str:
    """A calibration source as recorded: ``name:split`` (built-in) or ``file:PATH[:field]`` (:mod:`evaluators.sources`)."""
    found = file_source(part)
    if found is not None:
        return found
    name, split = parse_dataset(part)
    return f"{name}:{split or default_calibration_split(name)}"


def calibration_text(spec: str) -> str:
    """The calibration text of a dataset spec (default split: :func:`default_calibration_split`) or
    of a file source (:func:`source_part`); a test split is refused. Reading it also checks, before
    any model loads, that it exists."""
    found = file_source(spec)
    if found is not None:
        return file_text(found)
    name, split = parse_dataset(spec)
    split = split or default_calibration_split(name)
    if split in HELD_OUT_SPLITS:
        raise UserError(f"calibration on the {split} split would leak into the evaluation; use validation, "
                        "train or c4's calib")
    return load_text(name, split)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D tensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, *, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (the last partial one dropped)."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise UserError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        count = min(count, limit)
    return tokens[: count * seqlen].view(count, seqlen)


WHOLE = (0.0, 1.0)


def region_bounds(count: int, region: tuple[float, float]) -> tuple[int, int]:
    """The token positions ``[start, end)`` of a region given as fractions of ``count`` tokens."""
    low, high = region
    return int(low * count), int(high * count)


def region_starts(count: int, *, nsamples: int, seqlen: int, seed: int,
                  region: tuple[float, float] = WHOLE) -> torch.Tensor:
    """Seeded random start positions of ``nsamples`` windows of ``seqlen`` tokens lying wholly
    inside ``region`` of a text of ``count`` tokens."""
    start, end = region_bounds(count, region)
    if end - start <= seqlen:
        where = "the text" if region == WHOLE else f"the region {region[0]:g}-{region[1]:g} of the text"
        raise UserError(f"{where} has {end - start} tokens, fewer than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    return start + torch.randint(0, end - start - seqlen, (nsamples,), generator=generator)


def random_windows(tokens: torch.Tensor, *, nsamples: int, seqlen: int, seed: int,
                   region: tuple[float, float] = WHOLE) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (the calibration recipe
    of GPTQ/SparseGPT/Wanda/FLAP), inside ``region`` (fractions of the text; default all of it)."""
    starts = region_starts(tokens.numel(), nsamples=nsamples, seqlen=seqlen, seed=seed, region=region)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def dataset_windows(
    tokenizer, spec: str, *, seqlen: int, split: str | None = None, limit: int | None = None
) -> torch.Tensor:
    """Evaluation windows of a dataset spec (``name`` or ``name:split``)."""
    name, spec_split = parse_dataset(spec)
    split = split or spec_split or DATASETS[name].eval_split
    return eval_windows(tokenize(tokenizer, load_text(name, split)), seqlen=seqlen, limit=limit)


def calibration_windows(
    tokenizer, spec: str, *, nsamples: int, seqlen: int, seed: int = 0, split: str | None = None,
    region: tuple[float, float] = WHOLE,
) -> torch.Tensor:
    """Calibration windows (default split: :func:`default_calibration_split`; never test)."""
    if split is not None:
        spec = f"{parse_dataset(spec)[0]}:{split}"
    return random_windows(tokenize(tokenizer, calibration_text(spec)), nsamples=nsamples, seqlen=seqlen, seed=seed,
                          region=region)


def share(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` counts as equal as can be (the first ones larger)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration windows: dataset spec, count, length, seed, and the region of the text
    they are drawn from (fractions of its tokens; recorded in every result). Windows of specs on
    disjoint regions of the same text never share a token (:meth:`overlaps`).

    Several sources join by ``+`` (``wikitext2+c4:calib``, ``wikitext2+chats.jsonl:text``): the
    windows are shared among them equally, each drawn from the same region of its own text."""

    dataset: str = "wikitext2"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    region: tuple[float, float] = WHOLE

    def __post_init__(self):
        self.parts()  # every source names a dataset or an existing file
        object.__setattr__(self, "region", tuple(float(x) for x in self.region))
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {self.nsamples} x {self.seqlen}")
        if len(self.region) != 2 or not 0 <= self.region[0] < self.region[1] <= 1:
            raise UserError(f"a calibration region is two fractions 0 <= start < end <= 1, got {self.region}")

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationSpec":
        parts = "+".join(f"{n}:{s}" for n, s in zip(d["dataset"].split("+"), d["split"].split("+")))
        return cls(parts, d["nsamples"], d["seqlen"], d["seed"], tuple(d.get("region", WHOLE)))

    def parts(self) -> list[str]:
        """The sources, each ``name:split`` (default split filled in) or ``file:PATH[:field]``."""
        return [source_part(part) for part in self.dataset.split("+")]

    def check_text(self) -> None:
        """Read every source now, so that a missing or test split fails before any model loads."""
        for part in self.parts():
            calibration_text(part)

    def windows(self, tokenizer) -> torch.Tensor:
        parts = self.parts()
        return torch.cat([
            calibration_windows(tokenizer, part, nsamples=n, seqlen=self.seqlen, seed=self.seed, region=self.region)
            for part, n in zip(parts, share(self.nsamples, len(parts))) if n
        ])

    def overlaps(self, other: "CalibrationSpec") -> bool:
        """Whether windows of the two specs can share text (a common source, overlapping regions)."""
        same_text = bool(set(self.parts()) & set(other.parts()))
        return same_text and self.region[0] < other.region[1] and other.region[0] < self.region[1]

    def to_dict(self) -> dict:
        parts = self.parts()
        names, splits = zip(*(part.split(":", 1) for part in parts))
        data = {"dataset": "+".join(names), "split": "+".join(splits),
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}
        files = {part: fingerprint(part) for part in parts if part.startswith(FILE_SOURCE)}
        if files:  # an edited file is other data: cached scores and resumed runs must not take it for the same
            data["files"] = files
        if self.region != WHOLE:  # a whole-text spec keeps the record (and cache keys) of earlier versions
            data["region"] = list(self.region)
        return data
