"""Speed and memory of a model: prefill and decode throughput, time to first token, peak memory.

A pruned model is only worth having if it is really faster and smaller on the user's machine,
so this measures what a user of ``generate`` would see, not FLOPs:

- **prefill**: one forward pass over a batch x length of random token ids, without a KV cache,
  computing the logits of the last position only (as ``generate`` does); tokens/s = batch x
  length / seconds.
- **decode**: greedy decoding with the KV cache for a fixed number of new tokens (EOS never
  stops it). The first step (prefill of the prompt + first token) is the **time to first
  token**; decode tokens/s counts the remaining steps only.
- **memory**: on CUDA the allocator's peak above what was allocated before the run; on CPU the
  peak resident set size (RSS) above the RSS before the run. Linux's high-water mark
  (VmHWM) is reset through ``/proc/self/clear_refs`` and freed heap is handed back with
  ``malloc_trim`` first, so memory freed by an earlier run cannot hide this run's. The model's
  own footprint estimate is weight bytes + that increase.

Timings are medians over ``repeats``; ``compare`` interleaves several models within each repeat
(rotating who goes first) so that noise from other jobs on a shared machine hits all of them.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import statistics
import time
from pathlib import Path

import torch

from evaluators.environment import cpu_model

Shape = tuple[int, int]


# --- memory --------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_freed_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the increase may then be underestimated
        pass


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``.increase`` = peak memory during the block minus memory before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.increase: int | None = None
        self.method = "unavailable"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            _release_freed_heap()
            self.before = _status_kib("VmRSS")
            if self.before is not None and _reset_rss_peak():
                self.method = "VmHWM after clear_refs, minus VmRSS before"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.increase = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.method != "unavailable":
            self.increase = 1024 * max(0, _status_kib("VmHWM") - self.before)
        return False


# --- what is measured ----------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _tokens(model, batch: int, length: int, *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(_device(model))


def cache_argument(model) -> str:
    """The KV cache's argument (and output field) name: ``cache`` since transformers 5.24, where
    ``past_key_values`` is deprecated (removed in 5.40); ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward_kwargs(model) -> dict:
    # HF causal LMs take logits_to_keep; models that do not compute all logits (noted in results).
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor) -> float:
    """Seconds for one forward pass over ``ids`` without a cache."""
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, **_forward_kwargs(model))
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(time to first token, seconds for the other ``new_tokens - 1`` greedy steps, the tokens).

    A plain loop over the KV cache rather than ``generate``: the same work without its
    per-step bookkeeping, and the first token can be timed on its own.
    """
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **_forward_kwargs(model))
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    _sync(device)
    first = time.perf_counter()
    name = cache_argument(model)
    cache = getattr(out, name)
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{name: cache})
        cache = getattr(out, name)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    _sync(device)
    return first - start, time.perf_counter() - first, torch.cat(tokens, dim=1)


def model_info(model) -> dict:
    """Parameter count, weight bytes (tied weights counted once), dtype, device, threads."""
    params = list(model.parameters())  # nn.Module already yields a tied parameter once
    return {
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "device": str(params[0].device),
        "torch_threads": torch.get_num_threads(),
    }


# --- one repeat, many repeats, many models -------------------------------------------------


def _one_repeat(model, *, shapes, decode_tokens: int, decode_prompt: int, seed: int) -> dict:
    """Every measurement once: prefill seconds and memory per shape, then the decode run."""
    device = _device(model)
    raw = {"prefill": [], "prefill_memory": []}
    for batch, length in shapes:
        ids = _tokens(model, batch, length, seed=seed)
        with PeakMemory(device) as memory:
            raw["prefill"].append(time_prefill(model, ids))
        raw["prefill_memory"].append(memory.increase)
    prompt = _tokens(model, 1, decode_prompt, seed=seed + 1)
    with PeakMemory(device) as memory:
        raw["ttft"], raw["decode"], _ = time_decode(model, prompt, decode_tokens)
    raw["decode_memory"], raw["memory_method"] = memory.increase, memory.method
    return raw


def _summarise(model, runs: list[dict], *, shapes, decode_tokens: int, decode_prompt: int) -> dict:
    """Medians over repeats (and every raw time, to judge the noise)."""
    info = model_info(model)
    prefill = []
    for i, (batch, length) in enumerate(shapes):
        seconds = [r["prefill"][i] for r in runs]
        memory = [r["prefill_memory"][i] for r in runs if r["prefill_memory"][i] is not None]
        prefill.append({
            "batch": batch, "length": length, "seconds": statistics.median(seconds), "all_seconds": seconds,
            "tokens_per_s": batch * length / statistics.median(seconds),
            "peak_increase_bytes": max(memory) if memory else None,
        })
    decode_s = [r["decode"] for r in runs]
    steps = decode_tokens - 1
    peaks = [p["peak_increase_bytes"] for p in prefill] + [r["decode_memory"] for r in runs]
    peaks = [p for p in peaks if p is not None]
    increase = max(peaks) if peaks else None
    return {
        **info,
        "prefill": prefill,
        "prefill_logits": "last position" if _forward_kwargs(model) else "all positions",
        "decode": {
            "batch": 1, "prompt_length": decode_prompt, "new_tokens": decode_tokens,
            "seconds": statistics.median(decode_s), "all_seconds": decode_s,
            "tokens_per_s": steps / statistics.median(decode_s) if steps > 0 else None,
        },
        "ttft_s": statistics.median(r["ttft"] for r in runs),
        "all_ttft_s": [r["ttft"] for r in runs],
        "peak_increase_bytes": increase,
        "peak_memory_bytes": info["weight_bytes"] + increase if increase is not None else None,
        "memory_method": runs[0]["memory_method"],
        "cpu": cpu_model() if info["device"] == "cpu" else torch.cuda.get_device_name(_device(model)),
    }


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``"1x128,4x512"`` -> ((1, 128), (4, 512)); ValueError on anything else."""
    try:
        shapes = tuple(tuple(int(x) for x in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"expected batch x length shapes such as 1x128,4x512, got {text!r}")
    return shapes


def _check(shapes, decode_tokens: int, repeats: int, warmup: int) -> tuple[Shape, ...]:
    shapes = tuple((int(b), int(n)) for b, n in shapes)
    if not shapes or any(b < 1 or n < 1 for b, n in shapes):
        raise ValueError(f"shapes must be (batch, length) pairs of positive numbers, got {shapes}")
    if decode_tokens < 2 or repeats < 1 or warmup < 0:
        raise ValueError("need decode_tokens >= 2, repeats >= 1 and warmup >= 0")
    return shapes


def compare(
    models: dict[str, torch.nn.Module],
    *,
    shapes=((1, 128), (1, 512), (4, 512)),
    decode_tokens: int = 64,
    decode_prompt: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Benchmark several models in one run, interleaved; ratios against the first (the dense one).

    All models get the same random token ids (they share a vocabulary). Speed ratios are
    model / first for tokens/s (higher is faster) and first / model for TTFT; memory and size
    ratios are model / first (lower is smaller).
    """
    shapes = _check(shapes, decode_tokens, repeats, warmup)
    names = list(models)
    if not names:
        raise ValueError("no models to compare")
    load_before = _load_average()
    options = dict(shapes=shapes, decode_tokens=decode_tokens, decode_prompt=decode_prompt, seed=seed)
    runs = {name: [] for name in names}
    # Everything alive now (models, libraries) moves out of the collector's sight: the collection
    # before each measurement then costs milliseconds, not a second, and cannot fire mid-run.
    gc.collect()
    gc.freeze()
    try:
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                _one_repeat(model, **options)
        for repeat in range(repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                runs[name].append(_one_repeat(models[name], **options))
    finally:
        gc.unfreeze()
    results = {name: _summarise(models[name], runs[name], shapes=shapes, decode_tokens=decode_tokens,
                                decode_prompt=decode_prompt) for name in names}
    return {
        "config": {"shapes": [list(s) for s in shapes], "decode_tokens": decode_tokens,
                   "decode_prompt": decode_prompt, "repeats": repeats, "warmup": warmup, "seed": seed,
                   "order": "interleaved per repeat, rotating the first model",
                   # other jobs on a shared machine: the timings are only as good as this
                   "load_average_1min": {"before": load_before, "after": _load_average()}},
        "reference": names[0],
        "models": results,
        "ratios": {name: ratios(results[name], results[names[0]]) for name in names},
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(result: dict, reference: dict) -> dict:
    """Speedups (>1 = faster) and size ratios (<1 = smaller) of ``result`` against ``reference``."""
    return {
        "prefill_tokens_per_s": [
            {"batch": p["batch"], "length": p["length"], "ratio": _ratio(p["tokens_per_s"], q["tokens_per_s"])}
            for p, q in zip(result["prefill"], reference["prefill"])
        ],
        "decode_tokens_per_s": _ratio(result["decode"]["tokens_per_s"], reference["decode"]["tokens_per_s"]),
        "ttft_speedup": _ratio(reference["ttft_s"], result["ttft_s"]),
        "params": _ratio(result["params"], reference["params"]),
        "weight_bytes": _ratio(result["weight_bytes"], reference["weight_bytes"]),
        "peak_memory_bytes": _ratio(result["peak_memory_bytes"], reference["peak_memory_bytes"]),
    }

