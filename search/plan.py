"""The memory plan of a search, before anything heavy runs (``llm-pruner search --dry-run``).

Per worker, in bytes, from the model's config alone (built on the ``meta`` device, no weights):

* ``weights_bytes``: the model in the search dtype;
* ``fitness_bytes``: the least-squares solver state the fitness keeps per layer and output projection
  (:class:`reform.lstsq.PrefixLstsq` after ``precompute``): the float32 ``L⁻¹`` and ``P = L⁻¹ B``,
  and for o_proj (whose kept heads are not always a prefix) the float64 factor of ``C + λI`` and ``B``;
* ``cache_bytes``: the fitness's cache of rectified layers (its bound);
* ``activation_bytes``: one forward of a batch of fitness windows (hidden states, the widest MLP
  activations, one chunk of float32 logits and their log-softmax);
* ``logits_bytes``: the dense model's top-K distributions of a KL fitness;
* ``prepare_bytes``: the preparation pass, where the model is still float32 while the solvers fill;
* ``peak_bytes``: the larger of the preparation and the search; ``fits`` against the device memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from evaluators.perplexity import LOGIT_CHUNK
from search.config import SearchConfig
from search.prepare import PREFIX_ONLY
from space.adapters import adapter_for
from space.errors import UserError
from space.models import resolve
from space.subnet import ModelDims, Subnet

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FITNESS_CACHE_BYTES = 1 << 30  # search.fitness.Fitness's default bound
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


def solver_bytes(dims: ModelDims) -> int:
    """Bytes of the fitness's prefix solvers over every layer: o_proj's keep the float64 factor and
    ``B`` beside the float32 ``L⁻¹`` and ``P`` (12 d_in² + 12 d_in d_out), down_proj's only the float32
    pair (``PREFIX_ONLY``: 4 d_in² + 4 d_in d_out)."""
    per_layer = 0
    for name, d_in in (("o", dims.num_heads * dims.head_dim), ("down", dims.intermediate_size)):
        bytes_per = 4 if name in PREFIX_ONLY else 12
        per_layer += bytes_per * (d_in * d_in + d_in * dims.hidden_size)
    return dims.num_layers * per_layer


def device_memory(device: str, gpu_memory_gb: float | None) -> int | None:
    """What the worker's device holds: ``--gpu-memory`` when given, else the visible device's."""
    if gpu_memory_gb is not None:
        return int(gpu_memory_gb * 1e9)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_plan(config: SearchConfig, dims: ModelDims, vocab_size: int, *, memory: int | None) -> dict:
    """The plan of ``config`` for a model of ``dims`` (see the module's docstring)."""
    size = DTYPE_BYTES[config.dtype]
    params = Subnet.dense(dims).total_params()
    fitness = config.calibration_spec("fitness_windows")
    seqlen = fitness.seqlen
    batch = min(FITNESS_BATCH, fitness.nsamples)
    fitness_bytes = solver_bytes(dims) if config.fitness_reform == "lstsq" else 0
    hidden = 2 * dims.hidden_size + 3 * dims.intermediate_size + (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim
    activation_bytes = batch * seqlen * hidden * size + 2 * batch * min(seqlen, LOGIT_CHUNK) * vocab_size * 4
    logits_bytes = fitness.nsamples * (seqlen - 1) * (config.fitness_top_k * 8 + 4) if config.fitness == "kl" else 0
    search_bytes = params * size + fitness_bytes + FITNESS_CACHE_BYTES + activation_bytes + logits_bytes
    prepare_bytes = params * 4 + fitness_bytes + batch * seqlen * hidden * 4
    peak = max(search_bytes, prepare_bytes)
    return {
        "model": config.model, "dtype": config.dtype, "device": config.device, "params": params,
        "weights_bytes": params * size, "fitness_bytes": fitness_bytes, "cache_bytes": FITNESS_CACHE_BYTES,
        "activation_bytes": activation_bytes, "logits_bytes": logits_bytes, "prepare_bytes": prepare_bytes,
        "peak_bytes": peak, "device_bytes": memory, "fits": None if memory is None else peak <= memory,
        "seconds_per_candidate": None,  # not measured for this model here
    }


def plan_for(config: SearchConfig, *, gpu_memory_gb: float | None = None) -> dict:
    hf_config = model_config(config.model)
    return memory_plan(config, config_dims(hf_config), hf_config.vocab_size,
                       memory=device_memory(config.device, gpu_memory_gb))


def check_plan(plan: dict) -> None:
    """Refuse a job whose plan does not fit its device, before it loads anything."""
    if plan["fits"] is False:
        raise UserError(f"this search needs about {plan['peak_bytes'] / 1e9:.1f} GB on {plan['device']} per worker "
                        f"(weights {plan['weights_bytes'] / 1e9:.1f}, solvers {plan['fitness_bytes'] / 1e9:.1f}, "
                        f"cache {plan['cache_bytes'] / 1e9:.1f}, activations {plan['activation_bytes'] / 1e9:.1f}, "
                        f"dense logits {plan['logits_bytes'] / 1e9:.1f}); the device has "
                        f"{plan['device_bytes'] / 1e9:.1f} GB. See --dry-run")


def describe(plan: dict) -> str:
    rows = [(k.removesuffix("_bytes"), plan[k]) for k in ("weights_bytes", "fitness_bytes", "cache_bytes",
                                                          "activation_bytes", "logits_bytes", "prepare_bytes",
                                                          "peak_bytes")]
    lines = [f"memory plan per worker ({plan['model']}, {plan['params'] / 1e9:.2f} B parameters, {plan['dtype']} "
             f"on {plan['device']}):"]
    lines += [f"  {name:<11} {value / 1e9:9.2f} GB" for name, value in rows]
    memory = plan["device_bytes"]
    lines.append(f"  device      {memory / 1e9:9.2f} GB: {'fits' if plan['fits'] else 'does NOT fit'}" if memory
                 else "  device      unknown (give --gpu-memory)")
    return "\n".join(lines)
