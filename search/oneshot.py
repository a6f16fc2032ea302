"""One-shot pruning: score units, order them, allocate widths by a rule, rectify, export.

The pipeline every recipe shares: a block-by-block calibration pass gives importance scores,
each layer is permuted into importance order, an allocation rule picks per-layer widths on the
budget, the kept output projections are rectified (reform/), and the kept slices are exported.
An existing export can be rectified again from its source model (:func:`reform_export`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from evaluators.data import CalibrationSpec
from evaluators.environment import environment
from reform.rectify import ReformSpec, rectify
from search.allocation import allocate
from space.adapters import ModelAdapter, adapter_for
from space.errors import UserError
from space.export import export_subnet
from space.importance import LayerScores, compute_scores, load_scores, save_scores, score_spec
from space.models import LoadedModel, cache_root, fingerprint
from space.slicing import LayerOrder, permute_model, sorted_scores
from space.subnet import ModelDims, Subnet

log = logging.getLogger(__name__)

IMPORTANCE_FILE = "importance.pt"


def importance_scores(
    adapter: ModelAdapter,
    tokenizer,
    names: list[str],
    *,
    calibration: CalibrationSpec,
    source: str,
    cache: Path | None = None,
    batch_size: int = 8,
    ratio: float | None = None,
    progress: Callable = lambda it: it,
) -> dict[str, list[LayerScores]]:
    """Scores of the dense model, read from ``cache`` (a run or export folder's file) or from the
    shared cache when either holds them for the same model and settings, else computed; written
    to both. ``ratio``: the target, for scores that depend on it (then part of the cache key)."""
    meta = scores_meta(source, calibration, names)
    if any(score_spec(n).uses_ratio for n in names):
        meta["ratio"] = ratio
    shared = shared_scores_path(meta)
    for path in (cache, shared):
        if path is not None and (cached := load_scores(path, meta)) is not None:
            log.info("importance scores from %s", path)
            if cache is not None and path != cache and cache.parent.is_dir():
                save_scores(cache, cached, meta)
            return cached
    needs_data = any(score_spec(n).needs_data for n in names)
    windows = calibration.windows(tokenizer) if needs_data else None
    scores = compute_scores(adapter, windows, names, batch_size=batch_size, ratio=ratio, progress=progress)
    shared.parent.mkdir(parents=True, exist_ok=True)
    save_scores(shared, scores, meta)
    if cache is not None and cache.parent.is_dir():
        save_scores(cache, scores, meta)
    return scores


def scores_meta(source: str, calibration: CalibrationSpec, names: list[str]) -> dict:
    """What a cached score file must match to be reused: the model (and its files' fingerprint),
    the calibration, the scores."""
    return {"source": source, "fingerprint": fingerprint(source), "calibration": calibration.to_dict(),
            "scores": sorted(names)}


def shared_scores_path(meta: dict) -> Path:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "importance" / f"{key}.pt"


def order_model(adapter: ModelAdapter, scores: list[LayerScores]) -> tuple[list[LayerOrder], list[LayerScores]]:
    """Permute every layer into the order of ``scores``; return the orders and sorted scores."""
    orders = [LayerOrder.from_scores(s, adapter.dims) for s in scores]
    permute_model(adapter, orders)
    return orders, [sorted_scores(s, o, adapter.dims) for s, o in zip(scores, orders)]


def orders_from_kept(kept: list[dict], dims: ModelDims) -> list[LayerOrder]:
    """Importance orders that reproduce an export's kept units (``subnet.json`` ``kept``): per
    layer the kept units first, in their recorded order, then the others in original order."""

    def kept_first(units: list[int], count: int) -> torch.Tensor:
        rest = sorted(set(range(count)) - set(units))
        return torch.tensor(list(units) + rest, dtype=torch.long)

    orders = []
    for layer in kept:
        groups = kept_first(layer["kv_heads"], dims.num_kv_heads)
        q_per_kv = len(layer["heads"]) // max(1, len(layer["kv_heads"]))
        heads = []
        for position, group in enumerate(groups.tolist()):
            base = group * dims.group_size
            own = layer["heads"][position * q_per_kv : (position + 1) * q_per_kv]  # empty past the kept groups
            heads.append(base + kept_first([h - base for h in own], dims.group_size))
        orders.append(LayerOrder(groups, torch.stack(heads), kept_first(layer["channels"], dims.intermediate_size)))
    return orders


def _reformed(adapter: ModelAdapter, subnet: Subnet, tokenizer, reform: ReformSpec, calibration: CalibrationSpec,
              *, batch_size: int, progress: Callable) -> tuple[dict, dict, float]:
    """Overrides, the recipe entry and the seconds of one reformation."""
    started = time.time()
    overrides = {}
    if reform.method != "none":
        windows = calibration.windows(tokenizer)
        overrides = rectify(adapter, subnet, windows, spec=reform, batch_size=batch_size, progress=progress)
    entry = {**reform.to_dict(), "calibration": calibration.to_dict() if reform.method != "none" else None}
    return overrides, entry, time.time() - started


def prune_one_shot(
    loaded: LoadedModel,
    *,
    ratio: float,
    importance: str,
    allocation: str,
    calibration: CalibrationSpec,
    out_dir: Path,
    reform: ReformSpec | None = None,
    reform_calibration: CalibrationSpec | None = None,
    mlp_step: int = 1,
    batch_size: int = 8,
    save_dtype=None,
    progress: Callable = lambda it: it,
) -> tuple[Subnet, dict]:
    """Prune ``loaded`` to ``ratio``, rectify it with ``reform`` (None: no compensation) on
    ``reform_calibration`` (default: ``calibration``), and export it to ``out_dir``; return the
    subnet and the record."""
    started = time.time()
    spec = score_spec(importance)
    adapter = adapter_for(loaded.model)
    scores = importance_scores(
        adapter, loaded.tokenizer, [importance], calibration=calibration, source=loaded.source.path,
        cache=None, batch_size=batch_size, ratio=ratio, progress=progress,
    )
    score_seconds = time.time() - started
    orders, ordered = order_model(adapter, scores[importance])
    subnet = allocate(allocation, adapter.dims, ordered, ratio=ratio, standardized=spec.standardized, mlp_step=mlp_step)
    log.info("subnet: block ratio %.4f, total ratio %.4f", subnet.ratio(), subnet.total_ratio())
    reform = reform or ReformSpec("none")
    overrides, reform_entry, reform_seconds = _reformed(
        adapter, subnet, loaded.tokenizer, reform, reform_calibration or calibration,
        batch_size=batch_size, progress=progress,
    )
    record = {
        "source": loaded.source.to_dict(),
        "target_ratio": ratio,
        "block_ratio": subnet.ratio(),
        "total_ratio": subnet.total_ratio(),
        "recipe": {
            "importance": importance,
            "allocation": allocation,
            "compensation": reform.method,
            "mlp_step": mlp_step,
            "calibration": calibration.to_dict() if spec.needs_data else None,
            "reform": reform_entry,
        },
        "seconds": {"importance": round(score_seconds, 3), "reform": round(reform_seconds, 3)},
        "environment": environment(),
    }
    export_subnet(adapter, subnet, orders, out_dir, tokenizer=loaded.tokenizer, metadata=record,
                  overrides=overrides, dtype=save_dtype)
    # The scores used, next to the export (the export replaced the folder, so written after it).
    save_scores(Path(out_dir) / IMPORTANCE_FILE, scores, scores_meta(loaded.source.path, calibration, [importance]))
    record["seconds"]["total"] = round(time.time() - started, 3)
    return subnet, record


def reform_export(
    loaded: LoadedModel,
    record: dict,
    *,
    reform: ReformSpec,
    calibration: CalibrationSpec,
    out_dir: Path,
    reformed_from: str,
    batch_size: int = 8,
    save_dtype=None,
    progress: Callable = lambda it: it,
) -> tuple[Subnet, dict]:
    """Rectify the subnet an export's ``record`` (its ``subnet.json``) describes, from its
    dense source model ``loaded``, and export the result to ``out_dir``."""
    started = time.time()
    adapter = adapter_for(loaded.model)
    subnet = Subnet.from_dict(record["subnet"])
    if subnet.dims != adapter.dims:
        raise UserError(f"the source model {loaded.source.path} does not have the shape the export records "
                        f"({adapter.dims} vs {subnet.dims})")
    orders = orders_from_kept(record["kept"], adapter.dims)
    permute_model(adapter, orders)
    overrides, reform_entry, reform_seconds = _reformed(
        adapter, subnet, loaded.tokenizer, reform, calibration, batch_size=batch_size, progress=progress,
    )
    kept_fields = ("source", "target_ratio", "block_ratio", "total_ratio")
    new_record = {
        **{key: record[key] for key in kept_fields if key in record},
        "recipe": {**record.get("recipe", {}), "compensation": reform.method, "reform": reform_entry},
        "reformed_from": reformed_from,
        "seconds": {"reform": round(reform_seconds, 3)},
        "environment": environment(),
    }
    export_subnet(adapter, subnet, orders, out_dir, tokenizer=loaded.tokenizer, metadata=new_record,
                  overrides=overrides, dtype=save_dtype)
    new_record["seconds"]["total"] = round(time.time() - started, 3)
    return subnet, new_record
