"""What every result file records about where and with what it was produced."""

from __future__ import annotations

import platform
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "optuna", "numpy", "datasets", "ray", "lm-eval", "llm-pruner")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := _version(p))},
        "machine": {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads(), "gpu": gpu},
        "git_commit": _git_commit(),
    }


BFLOAT16_MIN_SPEEDUP = 1.25  # bfloat16 over float32 matmul throughput that makes bfloat16 the faster choice


def fast_bfloat16(device: str = "cpu") -> bool:
    """Whether bfloat16 matmuls run faster than float32 ones on ``device``: on a GPU with native
    bfloat16 (or one not visible here: the worker's); on a CPU where a measured product says so
    (:func:`bfloat16_speedup` at least ``BFLOAT16_MIN_SPEEDUP``). The instruction set alone does not
    tell: with AVX-512 BF16 or AMX oneDNN runs bfloat16 at about 2-5x the float32 rate (the AVX-512
    EPYCs measured); AVX-512 without BF16 converts to float32 and is no faster (reported 2x slower on a
    Skylake Xeon: intel/intel-extension-for-pytorch#178); with AVX2 alone PyTorch falls back to generic
    kernels (on an AVX2 EPYC a SmolLM2 candidate scored 2.4x slower in bfloat16, its matmul peak 1/100
    of float32's: experiments/results/scoring_dtype.md)."""
    if device.startswith("cuda"):
        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.startswith("cpu"):
        return bfloat16_speedup() >= BFLOAT16_MIN_SPEEDUP
    return True  # other accelerators: the dtype their users choose; bfloat16 unless told


@lru_cache(maxsize=1)
def bfloat16_speedup() -> float:
    """bfloat16 over float32 matmul throughput on this CPU (512² products or smaller, about 0.3 s each
    dtype), measured once per process; a margin of BFLOAT16_MIN_SPEEDUP keeps a busy machine's noise
    from flipping the choice, since the cases it separates are 2-5x apart either way."""
    return matmul_tflops(torch.bfloat16, size=512, seconds=0.3) / matmul_tflops(torch.float32, size=512, seconds=0.3)


@torch.inference_mode()
def matmul_tflops(dtype: torch.dtype = torch.bfloat16, *, size: int = 2048, device: str = "cpu",
                  seconds: float = 2.0) -> float:
    """The achieved TFLOP/s of square ``size`` matmuls in ``dtype`` (best of about ``seconds``): the
    machine's practical peak, to quote beside any throughput measured in the same run.

    Where one ``size`` matmul would take over a quarter of ``seconds`` (bfloat16 on a CPU without AVX-512:
    PyTorch's generic kernels, about 1 GFLOP/s on two cores, 17 s for 2048²), the size halves until it
    would not (down to 256), estimated from a 256² probe: a peak that slow is an order of magnitude, and
    measuring it at 2048² made every result file's header cost a minute."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(n, n, generator=generator).to(device=device, dtype=dtype),
                torch.randn(n, n, generator=generator).to(device=device, dtype=dtype))

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t

    probe = min(size, 256)
    a, b = operands(probe)
    timed(a, b)  # warm-up
    per_flop = timed(a, b) / probe**3
    while size > probe and per_flop * size**3 > seconds / 4:
        size //= 2
    a, b = operands(size)
    timed(a, b)  # warm-up
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        best = min(best, timed(a, b))
    return 2 * size**3 / best / 1e12
