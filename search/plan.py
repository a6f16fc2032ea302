"""The memory plan of a search, before anything heavy runs (``llm-pruner search --dry-run``).

Per worker, in bytes, from the model's config alone (built on the ``meta`` device, no weights):

* ``weights_bytes``: the model in the search dtype;
* ``fitness_bytes``: the least-squares solver state the fitness keeps per layer and output projection
  (:class:`reform.lstsq.PrefixLstsq` after ``precompute``, in ``--solver-dtype``): ``L⁻¹`` and
  ``P = L⁻¹ B``, and for o_proj (whose kept heads are not always a prefix) the factor of ``C + λI``
  and ``B``; ``fitness_device_bytes`` of it on the worker's device (one layer's, with
  ``--solver-device cpu``: the rest is ``host_fitness_bytes``);
* ``cache_bytes``: the fitness's cache of rectified layers (its bound);
* ``prefix_bytes``: the hidden states the fitness keeps to start a child where it differs from
  earlier candidates (:class:`search.fitness.PrefixStates`, its bound);
* ``activation_bytes``: one forward of a batch of fitness windows (hidden states, the widest MLP
  activations, one chunk of float32 logits and their log-softmax);
* ``logits_bytes``: the dense model's top-K distributions of a KL fitness;
* ``prepare_bytes``: the preparation pass, where the model is still float32 while the solvers fill
  (with the calibration windows' hidden states and one projection's float64 factoring; before them
  the unit order's pass, which may hold every window's MLP activations of one block); on a GPU
  the float32 model stays in host memory and one block at a time is on the device
  (``prepare_streamed``), unless the importance score needs the whole model (gradients);
* ``peak_bytes``: the larger of the preparation and the search; ``fits`` against the device memory.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch

from evaluators.perplexity import logit_positions
from search.config import SearchConfig
from search.fitness import PREFIX_BYTES, cache_bound
from search.prepare import PREFIX_ONLY
from space.adapters import adapter_for
from space.errors import UserError
from space.scores import score_spec
from space.models import resolve
from space.subnet import ModelDims, Subnet

FITNESS_BATCH = 8  # windows per forward in the fitness


def model_config(spec: str):
    """The transformers config of a model spec: a folder (a config.json alone will do), a GGUF file
    or alias (its metadata), or a hub id."""
    from transformers import AutoConfig

    source = resolve(spec)
    if source.kind == "gguf":
        return AutoConfig.from_pretrained(str(Path(source.path).parent), gguf_file=Path(source.path).name)
    return AutoConfig.from_pretrained(source.path)


def config_dims(hf_config) -> ModelDims:
    """The model's dims, counted on a weightless (``meta``) copy."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return adapter_for(model).dims


def solver_bytes(dims: ModelDims, dtype_bytes: int = 4) -> int:
    """Bytes of the fitness's prefix solvers over every layer, ``L⁻¹`` and ``P`` in a dtype of
    ``dtype_bytes``: o_proj's keep them (d_in² + d_in d_out) and, for kept sets that are not
    prefixes, the factor and ``B`` (as many, in float32 at least); down_proj's only ``L⁻¹`` and
    ``P`` (``PREFIX_ONLY``)."""
    return dims.num_layers * sum(layer_solver_bytes(dims, dtype_bytes).values())


def layer_solver_bytes(dims: ModelDims, dtype_bytes: int = 4) -> dict[str, int]:
    """One layer's solver state per output projection (see :func:`solver_bytes`)."""
    out = {}
    for name, d_in in (("o", dims.num_heads * dims.head_dim), ("down", dims.intermediate_size)):
        per_element = dtype_bytes if name in PREFIX_ONLY else dtype_bytes + max(dtype_bytes, 4)
        out[name] = per_element * (d_in * d_in + d_in * dims.hidden_size)
    return out


def factoring_bytes(dims: ModelDims) -> int:
    """The float64 transient of forming one projection's solver (the widest): its gram, the factor,
    the identity and ``L⁻¹`` (d_in² each), ``B`` and ``L⁻¹ B`` (d_in d_out each)."""
    d_in = max(dims.num_heads * dims.head_dim, dims.intermediate_size)
    return 8 * (4 * d_in * d_in + 2 * d_in * dims.hidden_size)


def device_memory(device: str, gpu_memory_gb: float | None) -> int | None:
    """What the worker's device holds: ``--gpu-memory`` when given, else the visible device's."""
    if gpu_memory_gb is not None:
        return int(gpu_memory_gb * 1e9)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_plan(config: SearchConfig, dims: ModelDims, vocab_size: int, *, memory: int | None,
                cache_bytes: int | None = None, prefix_bytes: int = PREFIX_BYTES) -> dict:
    """The plan of ``config`` for a model of ``dims`` (see the module's docstring); ``cache_bytes``,
    ``prefix_bytes``: the bounds of the fitness's layer cache (default: the search's,
    :func:`search.fitness.cache_bound`) and kept hidden states."""
    size = getattr(torch, config.dtype).itemsize
    cache_bytes = cache_bound(dims, config.ratio, size) if cache_bytes is None else cache_bytes
    params = Subnet.dense(dims).total_params()
    fitness = config.calibration_spec("fitness_windows")
    statistics = config.calibration_spec()
    batch = min(FITNESS_BATCH, fitness.nsamples)
    lstsq = config.fitness_reform == "lstsq"
    solver_size = getattr(torch, config.state_dtype).itemsize
    fitness_bytes = solver_bytes(dims, solver_size) if lstsq else 0
    # solver state in host memory beside a GPU: the device holds one layer's rows while a solve runs
    on_host = config.solver_device == "cpu" and not config.device.startswith("cpu")
    device_fitness = (sum(layer_solver_bytes(dims, solver_size).values()) if lstsq else 0) if on_host else fitness_bytes
    hidden = 2 * dims.hidden_size + 3 * dims.intermediate_size + (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim
    logit_rows = batch * min(fitness.seqlen, logit_positions(batch))  # a chunk's logits and log-softmax in float32
    activation_bytes = batch * fitness.seqlen * hidden * size + 2 * logit_rows * vocab_size * 4
    logits_bytes = fitness.nsamples * (fitness.seqlen - 1) * (config.fitness_top_k * 8 + 4) if config.fitness == "kl" else 0
    search_bytes = params * size + device_fitness + cache_bytes + prefix_bytes + activation_bytes + logits_bytes
    # preparation: the float32 model (on a GPU streamed, one block at a time, unless the importance
    # score needs the whole model), every calibration window's hidden states in and out of a block,
    # one batch's activations, and one projection's float64 factoring
    order_score, order = score_spec(config.importance), config.order_calibration_spec()
    streamed = not config.device.startswith("cpu") and order_score.streamed
    prepared_model = dims.layer_params(dims.dense_layer()) * 4 if streamed else params * 4
    passed = max(statistics.nsamples, order.nsamples)  # the order's pass may take more
    calibration_bytes = 2 * passed * statistics.seqlen * dims.hidden_size * 4
    # an order that holds o_proj's and down_proj's inputs of every window runs before the solvers fill: the
    # larger counts
    held = dims.num_heads * dims.head_dim + dims.intermediate_size
    order_inputs = order.nsamples * order.seqlen * held * 4 if order_score.keeps_projection_inputs else 0
    prepare_bytes = (prepared_model + max(device_fitness, order_inputs) + calibration_bytes
                     + min(FITNESS_BATCH, passed) * statistics.seqlen * hidden * 4
                     + (factoring_bytes(dims) if lstsq else 0))
    peak = max(search_bytes, prepare_bytes)
    return {
        "model": config.model, "dtype": config.dtype, "device": config.device, "params": params,
        "solver_dtype": config.state_dtype, "solver_device": config.solver_device, "prepare_streamed": streamed,
        "gpus_per_worker": config.gpus_per_worker,
        "weights_bytes": params * size, "fitness_bytes": fitness_bytes, "fitness_device_bytes": device_fitness,
        "host_fitness_bytes": fitness_bytes if on_host else 0, "cache_bytes": cache_bytes, "prefix_bytes": prefix_bytes,
        "activation_bytes": activation_bytes, "logits_bytes": logits_bytes, "prepare_bytes": prepare_bytes,
        "peak_bytes": peak, "device_bytes": memory, "fits": None if memory is None else peak <= memory,
        "seconds_per_candidate": None, "measured_trials": 0,  # from a run folder's finished trials
    }


def plan_for(config: SearchConfig, *, gpu_memory_gb: float | None = None, run_dir: Path | None = None) -> dict:
    """The plan of ``config``; a worker spanning ``gpus_per_worker`` GPUs holds that many devices'
    memory (its model balanced over them, a block never split). ``run_dir``: a run folder of this
    search whose finished trials give the seconds per candidate."""
    hf_config = model_config(config.model)
    memory = device_memory(config.device, gpu_memory_gb)
    if memory is not None and not config.device.startswith("cpu"):
        memory *= config.gpus_per_worker
    plan = memory_plan(config, config_dims(hf_config), hf_config.vocab_size, memory=memory)
    if run_dir is not None:
        plan["seconds_per_candidate"], plan["measured_trials"] = measured_seconds(run_dir)
    return plan


def measured_seconds(run_dir: Path) -> tuple[float | None, int]:
    """Seconds per candidate in the run folder's study, and over how many finished trials: the median
    evaluation time of a trial, or for the staged evolution (whose trials are scored together, a
    generation at a time) the median of a generation's wall time over its trials. (None, 0) without
    a study or finished trials."""
    from search.rundir import STUDY_RECORD, load_run_study

    if not (Path(run_dir) / STUDY_RECORD).is_file():
        return None, 0
    done = [t for t in load_run_study(Path(run_dir)).get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    seconds = [t.user_attrs["eval_seconds"] for t in done if "eval_seconds" in t.user_attrs]
    generations: dict[int, list] = {}
    for t in done:
        if "eval_seconds" not in t.user_attrs and "generation" in t.user_attrs:
            generations.setdefault(t.user_attrs["generation"], []).append(t)
    for trials in generations.values():
        wall = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
        seconds += [wall.total_seconds() / len(trials)] * len(trials)
    return (statistics.median(seconds) if seconds else None), len(seconds)


def check_plan(plan: dict) -> None:
    """Refuse a job whose plan does not fit its device, before it loads anything."""
    if plan["fits"] is False:
        raise UserError(f"this search needs about {plan['peak_bytes'] / 1e9:.1f} GB on {plan['device']} per worker "
                        f"(weights {plan['weights_bytes'] / 1e9:.1f}, solvers {plan['fitness_device_bytes'] / 1e9:.1f}, "
                        f"caches {(plan['cache_bytes'] + plan['prefix_bytes']) / 1e9:.1f}, activations {plan['activation_bytes'] / 1e9:.1f}, "
                        f"dense logits {plan['logits_bytes'] / 1e9:.1f}); the device has "
                        f"{plan['device_bytes'] / 1e9:.1f} GB. See --dry-run")


def describe(plan: dict) -> str:
    rows = [(k.removesuffix("_bytes"), plan[k]) for k in ("weights_bytes", "fitness_device_bytes", "cache_bytes",
                                                          "prefix_bytes",
                                                          "activation_bytes", "logits_bytes", "prepare_bytes",
                                                          "peak_bytes")]
    lines = [f"memory plan per worker ({plan['model']}, {plan['params'] / 1e9:.2f} B parameters, {plan['dtype']} "
             f"on {plan['device']}; least-squares state {plan['solver_dtype']} on {plan['solver_device']}):"]
    labels = {"fitness_device": "solvers", "prefix": "states"}  # states: the kept hidden states
    lines += [f"  {labels.get(name, name):<11} {value / 1e9:9.2f} GB" for name, value in rows]
    if plan["host_fitness_bytes"]:
        lines.append(f"  (solvers in host memory: {plan['host_fitness_bytes'] / 1e9:.2f} GB)")
    if plan["seconds_per_candidate"] is not None:
        lines.append(f"  {plan['seconds_per_candidate']:.2f} s per candidate (median of the run folder's "
                     f"{plan['measured_trials']} finished trials)")
    memory = plan["device_bytes"]
    gpus = f" ({plan['gpus_per_worker']} GPUs)" if plan["gpus_per_worker"] > 1 else ""
    lines.append(f"  device      {memory / 1e9:9.2f} GB{gpus}: {'fits' if plan['fits'] else 'does NOT fit'}" if memory
                 else "  device      unknown (give --gpu-memory)")
    return "\n".join(lines)
