"""One-shot pruning: score units, order them, allocate widths by a rule, export.

The pipeline every recipe shares: a block-by-block calibration pass gives importance scores,
each layer is permuted into importance order, an allocation rule picks per-layer widths on the
budget, and the kept slices are exported.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from evaluators.data import CalibrationSpec
from evaluators.environment import environment
from search.allocation import allocate
from space.adapters import ModelAdapter, adapter_for
from space.export import export_subnet
from space.importance import LayerScores, compute_scores, load_scores, save_scores, score_spec
from space.models import LoadedModel
from space.slicing import LayerOrder, permute_model, sorted_scores
from space.subnet import Subnet

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
    progress: Callable = lambda it: it,
) -> dict[str, list[LayerScores]]:
    """Scores of the dense model, read from ``cache`` when it holds them for the same settings,
    else computed and, if ``cache`` is given, written there."""
    meta = scores_meta(source, calibration, names)
    if cache is not None and (cached := load_scores(cache, meta)) is not None:
        log.info("importance scores from %s", cache)
        return cached
    needs_data = any(score_spec(n).request.inputs for n in names)
    windows = calibration.windows(tokenizer) if needs_data else None
    scores = compute_scores(adapter, windows, names, batch_size=batch_size, progress=progress)
    if cache is not None and cache.parent.is_dir():
        save_scores(cache, scores, meta)
    return scores


def scores_meta(source: str, calibration: CalibrationSpec, names: list[str]) -> dict:
    """What a cached score file must match to be reused."""
    return {"source": source, "calibration": calibration.to_dict(), "scores": sorted(names)}


def order_model(adapter: ModelAdapter, scores: list[LayerScores]) -> tuple[list[LayerOrder], list[LayerScores]]:
    """Permute every layer into the order of ``scores``; return the orders and sorted scores."""
    orders = [LayerOrder.from_scores(s, adapter.dims) for s in scores]
    permute_model(adapter, orders)
    return orders, [sorted_scores(s, o, adapter.dims) for s, o in zip(scores, orders)]


def prune_one_shot(
    loaded: LoadedModel,
    *,
    ratio: float,
    importance: str,
    allocation: str,
    calibration: CalibrationSpec,
    out_dir: Path,
    mlp_step: int = 1,
    batch_size: int = 8,
    save_dtype=None,
    progress: Callable = lambda it: it,
) -> tuple[Subnet, dict]:
    """Prune ``loaded`` to ``ratio`` and export it to ``out_dir``; return the subnet and the record."""
    started = time.time()
    spec = score_spec(importance)
    adapter = adapter_for(loaded.model)
    scores = importance_scores(
        adapter, loaded.tokenizer, [importance], calibration=calibration, source=loaded.source.path,
        cache=None, batch_size=batch_size, progress=progress,
    )
    score_seconds = time.time() - started
    orders, ordered = order_model(adapter, scores[importance])
    subnet = allocate(allocation, adapter.dims, ordered, ratio=ratio, standardized=spec.standardized, mlp_step=mlp_step)
    log.info("subnet: block ratio %.4f, total ratio %.4f", subnet.ratio(), subnet.total_ratio())
    record = {
        "source": loaded.source.to_dict(),
        "target_ratio": ratio,
        "block_ratio": subnet.ratio(),
        "total_ratio": subnet.total_ratio(),
        "recipe": {
            "importance": importance,
            "allocation": allocation,
            "compensation": "none",
            "mlp_step": mlp_step,
            "calibration": calibration.to_dict() if spec.request.inputs else None,
        },
        "seconds": {"importance": round(score_seconds, 3)},
        "environment": environment(),
    }
    export_subnet(adapter, subnet, orders, out_dir, tokenizer=loaded.tokenizer, metadata=record, dtype=save_dtype)
    # The scores used, next to the export (the export replaced the folder, so written after it).
    save_scores(Path(out_dir) / IMPORTANCE_FILE, scores, scores_meta(loaded.source.path, calibration, [importance]))
    record["seconds"]["total"] = round(time.time() - started, 3)
    return subnet, record
