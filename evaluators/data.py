"""Text datasets for calibration and perplexity: resolved to local files first, then to the hub.

A dataset name (``wikitext2``, ``ptb``, ``c4``) and a split resolve to a file under
``$LLM_PRUNER_DATA`` (the layout of the project's ``shared/data`` folder); only when no local
file exists is the Hugging Face hub asked, through ``datasets``. Local files are read directly:
they are small, and reading them exactly as the hub's loaders would (row joining included) is
what keeps numbers comparable with the papers.

Tokenised text is cut into windows: non-overlapping ones for evaluation, seeded random ones for
calibration (deterministic for a given seed). Calibration may also read data of the user's own (a
text or JSONL file, any dataset the ``datasets`` library opens; :mod:`evaluators.sources`), and may
wrap each document in the model's chat template first. The datasets themselves: :mod:`evaluators.texts`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluators.sources import (
    fingerprint,
    own_documents,
    own_source,
    own_text,
    refuse_held_out,
    register_dataset,
    render_chat,
)
from evaluators.texts import ALIASES, DATASETS, TextDataset, paragraphs
from space.errors import UserError

log = logging.getLogger(__name__)

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


def split_file(dataset: TextDataset, split: str) -> Path | None:
    """The local file of a built-in dataset's split, or None."""
    relative = dataset.local.get(split)
    return local_file(relative) if relative else None


def load_text(name: str, split: str) -> str:
    """The whole text of one split, from ``$LLM_PRUNER_DATA`` if there, else from the hub."""
    dataset = DATASETS[parse_dataset(name)[0]]
    relative = dataset.local.get(split)
    path = split_file(dataset, split)
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


def load_documents(name: str, split: str) -> list[str]:
    """The documents of one split: its local file's (rows, sentences, paragraphs), else the
    paragraphs of the hub's text."""
    dataset = DATASETS[parse_dataset(name)[0]]
    path = split_file(dataset, split)
    return dataset.local_documents(path, split) if path is not None else paragraphs(load_text(name, split))


def default_calibration_split(name: str) -> str:
    """The split calibration reads when none is named: C4's ``calib`` part of the local sample
    (no local validation text ships; ``heldout`` is the other part), the validation split of the
    others; never a test split."""
    return "calib" if name == "c4" else "validation"


def calibration_split(spec: str) -> tuple[str, str]:
    """(name, split) of a built-in dataset spec to calibrate on (default split filled in; a test split refused)."""
    name, split = parse_dataset(spec)
    split = split or default_calibration_split(name)
    refuse_held_out(split)
    return name, split


def source_part(part: str) -> str:
    """A calibration source as recorded: ``name:split`` (built-in) or one of the user's own
    (``file:PATH[:field]``, ``hf:...``, ``memory:...``; :mod:`evaluators.sources`)."""
    found = own_source(part)
    if found is not None:
        return found
    name, split = parse_dataset(part)
    return f"{name}:{split or default_calibration_split(name)}"


def calibration_text(spec: str) -> str:
    """The calibration text of a dataset spec (default split: :func:`default_calibration_split`) or
    of a source of the user's own (:func:`source_part`); a test split is refused. Reading it also
    checks, before any model loads, that it exists."""
    found = own_source(spec)
    return own_text(found) if found is not None else load_text(*calibration_split(spec))


def calibration_documents(spec: str) -> list:
    """The documents of a calibration source (what ``--chat-template`` wraps one by one)."""
    found = own_source(spec)
    return own_documents(found) if found is not None else load_documents(*calibration_split(spec))


def source_tokens(tokenizer, spec: str, *, chat_template: bool = False) -> torch.Tensor:
    """All token ids of a calibration source, its documents wrapped in the tokenizer's chat template
    when ``chat_template``."""
    if not chat_template:
        return tokenize(tokenizer, calibration_text(spec))
    return tokenize(tokenizer, render_chat(tokenizer, calibration_documents(spec)))


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


def region_starts(count: int, *, nsamples: int, seqlen: int, seed: int | None,
                  region: tuple[float, float] = WHOLE) -> torch.Tensor:
    """Seeded random start positions of ``nsamples`` windows of ``seqlen`` tokens lying wholly
    inside ``region`` of a text of ``count`` tokens; with no seed, starts evenly spaced over the same
    range (the first at the region's start): windows no draw decides, which never overlap while
    ``nsamples * seqlen`` fits in the region and cover it whole when it just fits."""
    start, end = region_bounds(count, region)
    if end - start <= seqlen:
        where = "the text" if region == WHOLE else f"the region {region[0]:g}-{region[1]:g} of the text"
        raise UserError(f"{where} has {end - start} tokens, fewer than one window of {seqlen}")
    last = end - start - seqlen - 1  # the largest offset a random draw can give
    if seed is None:
        return start + torch.linspace(0, last, nsamples, dtype=torch.float64).round().long()
    generator = torch.Generator().manual_seed(seed)
    return start + torch.randint(0, last + 1, (nsamples,), generator=generator)


def random_windows(tokens: torch.Tensor, *, nsamples: int, seqlen: int, seed: int | None,
                   region: tuple[float, float] = WHOLE) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (the calibration recipe
    of GPTQ/SparseGPT/Wanda/FLAP), inside ``region`` (fractions of the text; default all of it);
    evenly spaced ones where ``seed`` is None (:func:`region_starts`)."""
    starts = region_starts(tokens.numel(), nsamples=nsamples, seqlen=seqlen, seed=seed, region=region)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def dataset_windows(
    tokenizer, spec: str, *, seqlen: int, split: str | None = None, limit: int | None = None
) -> torch.Tensor:
    """Evaluation windows of a dataset spec (``name`` or ``name:split``)."""
    name, spec_split = parse_dataset(spec)
    split = split or spec_split or DATASETS[name].eval_split
    return eval_windows(tokenize(tokenizer, load_text(name, split)), seqlen=seqlen, limit=limit)


def shortage(count: int, *, source: str, seqlen: int, region: tuple[float, float]) -> str | None:
    """Why ``count`` tokens of ``source`` are too few for windows of ``seqlen`` tokens inside
    ``region`` (:func:`region_starts`), or None when they are enough."""

    def inside(total: int) -> int:
        start, end = region_bounds(total, region)
        return end - start

    if inside(count) > seqlen:
        return None
    width = region[1] - region[0]
    needed = int((seqlen + 1) / width) + 2  # enough, whatever the rounding; then the fewest from which all are
    while inside(needed - 1) > seqlen:
        needed -= 1
    where = "" if region == WHOLE else f" from {width:.0%} of its tokens (region {region[0]:g}-{region[1]:g})"
    return f"{source} has {count:,} tokens; windows of {seqlen} tokens{where} need at least {needed:,}"


def calibration_windows(
    tokenizer, spec: str, *, nsamples: int, seqlen: int, seed: int | None = 0, split: str | None = None,
    region: tuple[float, float] = WHOLE, chat_template: bool = False,
) -> torch.Tensor:
    """Calibration windows (default split: :func:`default_calibration_split`; never test), the
    documents wrapped in the tokenizer's chat template when ``chat_template``."""
    if split is not None:
        spec = f"{parse_dataset(spec)[0]}:{split}"
    tokens, source = source_tokens(tokenizer, spec, chat_template=chat_template), source_part(spec)
    short = shortage(tokens.numel(), source=source, seqlen=seqlen, region=region)
    if short:
        raise UserError(f"too little calibration text: {short}")
    available = int((region[1] - region[0]) * tokens.numel())
    if nsamples * seqlen > available:
        log.warning("%d calibration windows of %d tokens overlap: %s has %d tokens to draw them from",
                    nsamples, seqlen, source, available)
    return random_windows(tokens, nsamples=nsamples, seqlen=seqlen, seed=seed, region=region)


def share(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` counts as equal as can be (the first ones larger)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration windows: dataset spec, count, length, seed, the region of the text they
    are drawn from (fractions of its tokens; recorded in every result), and whether each document
    goes through the model's chat template first. Windows of specs on disjoint regions of the same
    text never share a token (:meth:`overlaps`).

    Several sources join by ``+`` (``wikitext2+c4:calib``, ``wikitext2+chats.jsonl:text``): the
    windows are shared among them equally, each drawn from the same region of its own text. The
    data may also be a ``datasets.Dataset`` (its ``text`` column or its only one; this process only)."""

    dataset: str = "wikitext2"
    nsamples: int = 64
    seqlen: int = 512
    seed: int | None = 0  # None: evenly spaced windows (region_starts)
    region: tuple[float, float] = WHOLE
    chat_template: bool = False

    def __post_init__(self):
        if not isinstance(self.dataset, str):
            object.__setattr__(self, "dataset", register_dataset(self.dataset))
        self.parts()  # every source names a dataset or an existing file
        object.__setattr__(self, "region", tuple(float(x) for x in self.region))
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {self.nsamples} x {self.seqlen}")
        if len(self.region) != 2 or not 0 <= self.region[0] < self.region[1] <= 1:
            raise UserError(f"a calibration region is two fractions 0 <= start < end <= 1, got {self.region}")

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationSpec":
        parts = "+".join(f"{n}:{s}" for n, s in zip(d["dataset"].split("+"), d["split"].split("+")))
        return cls(parts, d["nsamples"], d["seqlen"], d["seed"], tuple(d.get("region", WHOLE)),
                   d.get("chat_template", False))

    def parts(self) -> list[str]:
        """The sources, each ``name:split`` (default split filled in) or one of the user's own (``file:``, ``hf:``, ...)."""
        return [source_part(part) for part in self.dataset.split("+")]

    def check_text(self, tokenizer=None) -> None:
        """Read every source now, so that a missing or test split fails before any model loads
        (:func:`check_calibration`)."""
        check_calibration([self], tokenizer)

    def windows(self, tokenizer) -> torch.Tensor:
        parts = self.parts()
        return torch.cat([
            calibration_windows(tokenizer, part, nsamples=n, seqlen=self.seqlen, seed=self.seed, region=self.region,
                                chat_template=self.chat_template)
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
        files = {part: found for part in parts if (found := fingerprint(part))}
        if files:  # an edited file or folder is other data: cached scores and resumed runs must not take it for the same
            data["files"] = files
        if self.region != WHOLE:  # a whole-text spec keeps the record (and cache keys) of earlier versions
            data["region"] = list(self.region)
        if self.chat_template:  # likewise
            data["chat_template"] = True
        return data


def check_calibration(specs: list[CalibrationSpec], tokenizer=None) -> None:
    """Read every source of ``specs`` now, so that a missing or test split fails before any model
    loads; given the model's tokenizer, also count their tokens (through the chat template where a
    spec asks for it): one UserError names every source too short for a spec's windows."""
    counts, short = {}, []
    for spec in specs:
        for part in spec.parts():
            if tokenizer is None:
                calibration_text(part)
                continue
            key = (part, spec.chat_template)
            if key not in counts:
                counts[key] = source_tokens(tokenizer, part, chat_template=spec.chat_template).numel()
            found = shortage(counts[key], source=part, seqlen=spec.seqlen, region=spec.region)
            if found and found not in short:
                short.append(found)
    if short:
        raise UserError("too little calibration text: " + "; ".join(short))


def as_calibration(value, **options) -> CalibrationSpec | None:
    """The calibration a Python API call was given: a :class:`CalibrationSpec` as it is, a dataset
    spec or a ``datasets.Dataset`` as a spec of ``options`` (its other fields); None stays None."""
    if value is None or isinstance(value, CalibrationSpec):
        return value
    return CalibrationSpec(value, **options)
