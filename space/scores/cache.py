"""The one cache of importance scores.

Scores of a dense model depend on the model (its files' fingerprint), the calibration windows,
the score, and for some scores (newton) the target ratio; that is the key. :class:`ScoreCache`
keeps computed scores in memory for the process (a comparison scores one model at many ratios)
and, for a model read from files, on disk too: in the shared folder
``$LLM_PRUNER_CACHE/importance`` and, when asked, as a copy in a run or export folder
(``importance.pt``), so that a resumed search or a Ray worker never computes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from space.adapters import ModelAdapter
from space.export.atomic import replace_file
from space.models import cache_root, fingerprint
from space.scores.base import LayerScores, compute_scores, score_spec

log = logging.getLogger(__name__)

IMPORTANCE_FILE = "importance.pt"


def score_key(names: list[str], *, source: str | None, calibration: dict | None, ratio: float | None,
              dtype: torch.dtype = torch.float32, pass_dtype: torch.dtype | None = None) -> dict:
    """What cached scores must match to be reused: the model and its files' fingerprint, the
    calibration windows, the scores, the ratio for the scores that depend on it, and the dtypes
    they were computed in when not float32, the model's and its passes' (float32 keys are those of
    earlier versions)."""
    key = {"source": source, "fingerprint": fingerprint(source) if source else None, "calibration": calibration,
           "scores": sorted(names)}
    if any(score_spec(n).uses_ratio for n in names):
        key["ratio"] = ratio
    if dtype != torch.float32:
        key["dtype"] = str(dtype).removeprefix("torch.")
    if pass_dtype not in (None, dtype) and any(score_spec(n).honours_pass_dtype for n in names):
        key["pass_dtype"] = str(pass_dtype).removeprefix("torch.")
    versions = {n: score_spec(n).version for n in sorted(names) if score_spec(n).version != 1}
    if versions:  # a corrected formula never serves the old one's scores (version 1 keys are unchanged)
        key["versions"] = versions
    return key


def save_scores(path: Path, scores: dict[str, list[LayerScores]], key: dict, *, seconds: float = 0.0) -> None:
    """Scores as one torch file (written whole, then renamed into place)."""
    payload = {
        "meta": key,
        "seconds": seconds,
        "scores": {
            name: [{"heads": s.heads, "groups": s.groups, "channels": s.channels} for s in layers]
            for name, layers in scores.items()
        },
    }
    replace_file(path, lambda tmp: torch.save(payload, tmp))


def load_scores(path: Path, key: dict) -> tuple[dict[str, list[LayerScores]], float] | None:
    """Scores stored at ``path`` and the seconds they took, or None when absent or made under
    another key."""
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    if payload.get("meta") != key:
        return None
    scores = {name: [LayerScores(**s) for s in layers] for name, layers in payload["scores"].items()}
    return scores, float(payload.get("seconds", 0.0))


def stored_seconds(path: Path) -> float:
    """What the scores stored at ``path`` took to compute, whenever that was (0 where not recorded)."""
    return float(torch.load(path, weights_only=True).get("seconds", 0.0))


@dataclass
class Scored:
    scores: dict[str, list[LayerScores]]
    seconds: float  # what computing them took, whenever that was
    reused: bool  # found in the cache by this call


class ScoreCache:
    """Importance scores by key, in memory and (``disk``, for models with a ``source`` path) on disk."""

    def __init__(self, *, disk: bool = True):
        self.disk = disk
        self.memory: dict[str, tuple[dict[str, list[LayerScores]], float]] = {}

    @staticmethod
    def _id(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def shared_path(self, key: dict) -> Path:
        return cache_root() / "importance" / f"{self._id(key)}.pt"

    @staticmethod
    def key(adapter: ModelAdapter, names: list[str], *, source: str | None, calibration: dict | None,
            ratio: float | None, pass_dtype: torch.dtype | None = None) -> dict:
        """The key of scores ``names`` of the model of ``adapter`` (see :func:`score_key`)."""
        dtype = next(adapter.model.parameters()).dtype
        return score_key(names, source=source, calibration=calibration, ratio=ratio, dtype=dtype,
                         pass_dtype=pass_dtype)

    def get(self, key: dict, *, copy_to: Path | None = None) -> tuple[dict[str, list[LayerScores]], float] | None:
        """Stored scores of ``key`` (memory, then ``copy_to``, then the shared folder), or None."""
        if self._id(key) in self.memory:
            return self.memory[self._id(key)]
        if not (self.disk and key["source"]):
            return None
        for path in (copy_to, self.shared_path(key)):
            if path is not None and (found := load_scores(path, key)) is not None:
                self.memory[self._id(key)] = found
                return found
        return None

    def put(self, key: dict, scores: dict[str, list[LayerScores]], seconds: float) -> None:
        self.memory[self._id(key)] = (scores, seconds)
        if self.disk and key["source"]:
            path = self.shared_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_scores(path, scores, key, seconds=seconds)

    def scores(
        self,
        adapter: ModelAdapter,
        names: list[str],
        *,
        windows: Callable[[], torch.Tensor],
        source: str | None,
        calibration: dict | None,
        ratio: float | None = None,
        copy_to: Path | None = None,
        batch_size: int = 8,
        execution_device: str | None = None,
        pass_dtype: torch.dtype | None = None,
        progress: Callable = lambda it: it,
    ) -> Scored:
        """Scores ``names`` of the dense ``adapter`` model, from the cache or computed on
        ``windows()`` (called only when computing, and only when a score needs data).
        ``copy_to``: a run or export folder's file that also receives them. ``execution_device``:
        computed block by block there; ``pass_dtype``: the blocks run in it (:func:`compute_scores`)."""
        key = self.key(adapter, names, source=source, calibration=calibration, ratio=ratio, pass_dtype=pass_dtype)
        found = self.get(key, copy_to=copy_to)
        reused = found is not None
        if found is None:
            started = time.time()
            data = windows() if any(score_spec(n).needs_data for n in names) else None
            scores = compute_scores(adapter, data, names, batch_size=batch_size, ratio=ratio,
                                    execution_device=execution_device, pass_dtype=pass_dtype, progress=progress)
            found = (scores, time.time() - started)
            self.put(key, *found)
        if copy_to is not None and copy_to.parent.is_dir() and load_scores(copy_to, key) is None:
            save_scores(copy_to, found[0], key, seconds=found[1])
        if reused:
            log.info("importance %s: reused from the cache (computed in %.0f s under the same model, data and "
                     "settings)", ", ".join(names), found[1])
        return Scored(found[0], found[1], reused)
