"""What the driver and every worker prepare once: the dense model, permuted into importance order
(scores from the run folder's cache), and the fitness built on it.

Only the config and the run folder travel to a worker (:class:`SearchEvaluator` is the picklable
factory Ray gets); each worker then loads and prepares its own copy.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from evaluators.data import CalibrationSpec
from reform.local import output_solvers
from reform.sequential import upstream_stats
from reform.targets import o_columns
from search.config import SearchConfig
from search.fitness import Fitness, cache_bound
from search.oneshot.allocation import ALLOCATIONS
from search.samplers.levels import UnitErrors, depth_start
from search.rundir import IMPORTANCE
from search.widths import WidthSpace
from space.adapters import ModelAdapter, adapter_for
from space.errors import UserError
from space.models import LoadedModel, load_model, place_model, worker_placement
from space.order import order_model
from space.scores import score_spec
from space.scores.base import LayerScores, standardize
from space.scores.cache import ScoreCache, Scored
from space.subnet import LayerWidths, Subnet


PREFIX_ONLY = ("down",)  # MLP channels are importance prefixes: their solvers keep the prefix form only


def dense_scores(loaded: LoadedModel, names: list[str], calibration: CalibrationSpec, *, ratio: float | None = None,
                 copy_to: Path | None = None, execution_device: str | None = None,
                 pass_dtype: torch.dtype | None = None) -> Scored:
    """Scores ``names`` of the dense ``loaded`` model on ``calibration``, through the shared score
    cache (and ``copy_to``, a run folder's file); ``execution_device``: computed there block by block,
    in ``pass_dtype`` (None: the model's)."""
    return ScoreCache().scores(
        adapter_for(loaded.model), names, windows=lambda: calibration.windows(loaded.tokenizer),
        source=loaded.source.path, calibration=calibration.to_dict(), ratio=ratio, copy_to=copy_to,
        execution_device=execution_device, pass_dtype=pass_dtype,
    )


def streamed_device(config: SearchConfig) -> str | None:
    """Where a streamed preparation runs its blocks: the search's GPU (the float32 model stays in host
    memory, one block at a time on the GPU); None on the CPU, where the model already is."""
    return None if config.device == "cpu" else config.device


class Prepared(NamedTuple):
    loaded: LoadedModel
    adapter: ModelAdapter  # of ``loaded.model``, permuted into the unit order
    orders: list  # per layer, the permutation applied (space.order.order_model)
    ordered: list[LayerScores]  # the scores in that order
    # what the unit order took to compute (whenever that was) and whether this preparation read it from the
    # score cache instead: a search's wall time without the order's is not the time of a cold command
    unit_order: dict


def load_prepared(config: SearchConfig, run_dir: Path, *, streamed: bool = False) -> Prepared:
    """The permuted dense model (float32) and its sorted scores, from the run folder's cache.
    ``streamed``: the model stays in host memory, the scores computed block by block on the
    search's device (:func:`streamed_device`); otherwise the model is on that device."""
    execution_device = streamed_device(config) if streamed else None
    placement = {} if execution_device else worker_placement(config.device, config.gpus_per_worker)
    loaded = load_model(config.model, dtype=torch.float32, device="cpu" if execution_device else config.device,
                        **placement)
    adapter = adapter_for(loaded.model)
    floor = WidthSpace(adapter.dims, preset=config.preset, mlp_step=config.mlp_step).bounds.min_ratio(adapter.dims)
    low = config.ratio_min if config.ratio_min is not None else config.ratio
    if low < floor - 1e-9:  # before the scores: the budget cannot be met inside these bounds
        raise UserError(f"--preset {config.preset} keeps at least a block ratio of {floor:.3f} of this model; "
                        f"ratio {low} needs a wider preset (wide or full)")
    # scores that depend on the target (newton's mask keeps that fraction) get the search's ratio;
    # for an nsga2 front, its upper end
    scored = dense_scores(loaded, [config.importance], config.order_calibration_spec(), ratio=config.ratio,
                          copy_to=run_dir / IMPORTANCE, execution_device=execution_device,
                          pass_dtype=getattr(torch, config.pass_dtype))
    orders, ordered = order_model(adapter, scored.scores[config.importance])
    return Prepared(loaded, adapter, orders, ordered, {"seconds": round(scored.seconds, 1), "reused": scored.reused})


@functools.lru_cache(maxsize=1)
def _fitness_parts(config_json: str, run_dir: str):
    """Permuted model in the search dtype and its prefix solvers: built once per process and
    shared by the search's fitness and the final re-scoring (one calibration pass, not two).
    Prepared streamed: the float32 model never sits whole on a GPU, only the search-dtype copy."""
    config = SearchConfig(**json.loads(config_json))
    loaded, adapter, _, ordered, _ = load_prepared(config, Path(run_dir), streamed=True)
    solvers = None
    if config.fitness_reform == "lstsq":
        windows = config.calibration_spec().windows(loaded.tokenizer)
        stats = None  # the dense model's
        if config.fitness_statistics == "upstream":
            space = WidthSpace(adapter.dims, preset=config.preset, mlp_step=config.mlp_step)
            anchor = starts_for(config, space, ordered, score_spec(config.importance).standardized)[0]
            stats = upstream_stats(adapter, anchor, windows, damping=config.damping, pass_dtype=config.pass_dtype,
                                   execution_device=streamed_device(config))
        solvers = output_solvers(adapter, windows, damping=config.damping, stats=stats,
                                 precompute=getattr(torch, config.state_dtype), prefix_only=PREFIX_ONLY,
                                 state_device="cpu" if config.solver_device == "cpu" else None,
                                 execution_device=streamed_device(config), pass_dtype=getattr(torch, config.pass_dtype))
    place_model(adapter.model.to(getattr(torch, config.dtype)), config.device,
                **worker_placement(config.device, config.gpus_per_worker))
    return adapter, solvers, loaded.tokenizer


def build_fitness(config: SearchConfig, run_dir: Path, *, windows: str = "fitness_windows") -> Fitness:
    """The fitness of this search on the windows ``windows`` names (a field of the config)."""
    adapter, solvers, tokenizer = _fitness_parts(json.dumps(config.to_dict(), sort_keys=True), str(run_dir))
    size = getattr(torch, config.dtype).itemsize
    return Fitness(adapter, config.calibration_spec(windows).windows(tokenizer), solvers=solvers, kind=config.fitness,
                   top_k=config.fitness_top_k, cache_bytes=cache_bound(adapter.dims, config.ratio, size))


def release_fitness() -> None:
    """Drop this process's prepared fitness (its model and solvers)."""
    _fitness_parts.cache_clear()


def unit_errors(config: SearchConfig, run_dir: Path, space: WidthSpace) -> UnitErrors | None:
    """The fitness's least-squares residual of every layer at every MLP width and attention shape
    of ``space`` (from the prefix solvers the fitness uses; None when the fitness has none)."""
    adapter, solvers, _ = _fitness_parts(json.dumps(config.to_dict(), sort_keys=True), str(run_dir))
    if solvers is None:
        return None
    dims = adapter.dims
    mlp, attention = [], []
    for layer_solvers in solvers:
        down, o = layer_solvers["down"], layer_solvers["o"]
        whole = down.explained(dims.intermediate_size)
        mlp.append(np.array([whole - down.explained(c) for c in space.grid]))
        whole = o.explained(dims.num_heads * dims.head_dim)
        kept = [o_columns(LayerWidths(kv, q, 0), dims) for kv, q in space.shapes]
        attention.append(np.array([whole - (o.explained(k) if kv else 0.0) for k, (kv, _) in zip(kept, space.shapes)]))
    return UnitErrors(mlp, attention)


class SearchEvaluator:
    """What a worker runs: widths in, scores out (picklable factory for Ray)."""

    def __init__(self, config: dict, run_dir: str):
        self.config = config
        self.run_dir = run_dir

    def __call__(self):
        fitness = build_fitness(SearchConfig(**self.config), Path(self.run_dir))

        def evaluate(payload: dict) -> dict:
            started = time.time()
            result = fitness.evaluate(Subnet.from_dict(payload["subnet"]), rows=payload.get("rows"),
                                      on_batch=payload.get("on_batch"))
            return {"value": result.value, "batch_values": result.batch_values, "pruned": result.pruned,
                    "seconds": time.time() - started, "cache_hits": fitness.cache.hits}

        return evaluate


def channel_scores(ordered) -> list[np.ndarray]:
    """Per layer, sorted channel scores standardised within the layer (comparable across layers)."""
    return [standardize(s.channels.double()).numpy() for s in ordered]


def starts_for(config: SearchConfig, space: WidthSpace, ordered, standardized: bool,
               errors: UnitErrors | None = None) -> list[Subnet]:
    """Importance-based allocations the search starts from, inside the space's bounds (the depth
    preset: whole sub-layers removed, the cheapest by ``errors`` first)."""
    if space.preset == "depth":
        return [depth_start(space, config.ratio, errors)]
    starts, failure = [], None
    for name in ("uniform-mlp", "global", "uniform"):
        try:
            proposal = ALLOCATIONS[name](space.dims, ordered, ratio=config.ratio, standardized=standardized)
            start = space.repair(proposal, config.ratio)
        except ValueError as exc:
            failure = exc
            continue
        if start not in starts:
            starts.append(start)
    if not starts:
        raise UserError(f"none of the one-shot allocations the search starts from could be brought onto ratio "
                        f"{config.ratio} ({failure}); give a finer --mlp-step")
    return starts
