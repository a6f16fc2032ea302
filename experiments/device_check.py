"""The GPU check of issue 15, as one prepared run on a lent device machine (an H200 here): the CUDA
tests, then a short search of a SmolLM2-shaped model with random bfloat16 weights on the GPU, its
seconds per candidate and peak memory set beside its memory plan, and the GPU's bfloat16 matmul
peak measured in the same run.

That machine reaches no network and holds neither ``../shared`` nor the bundled model nor some of
our dependencies, so the run is prepared here, into ``.device/`` (ignored by git, carried with the
call): the model's config and tokenizer (no weights: they are drawn there, seed 0), the texts the
search reads (WikiText-2, and C4 for the export's calibration above ratio 0.6), and the wheels of
the packages that machine lacks or has at another version.

    python experiments/device_check.py prepare          # here, with the package registry reachable
    # there (the device tool's run, carry [".device"], about 5 minutes):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl \
        && PYTHONPATH=/tmp/site:. python3 experiments/device_check.py run --out $OUT

``run --device cpu --sizes tiny`` runs the same on this CPU with small windows (what the unit test
does, on a tiny model; the CUDA tests need a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".device"
# What the device machine's image lacks, or holds at an older version than setup.cfg asks for
# (/work/.library/device/KINDS.md lists its packages): pinned to the versions installed here.
WHEELS = ("transformers", "optuna", "alembic", "sqlalchemy", "mako", "colorlog", "gguf")
# The search's window sizes: the defaults of the day on the GPU; tiny ones for the unit test's tiny model.
SIZES = {"default": {},
         "tiny": {"nsamples": 8, "calib_seqlen": 32, "fitness_nsamples": 4, "fitness_seqlen": 32, "final_nsamples": 8,
                  "export_nsamples": 8, "evolution": "staged-tiny", "mlp_step": 1, "final_top_k": 2}}
TEXTS = ("wikitext-2-raw-v1", "c4")  # the statistics, fitness, re-scoring and export texts; test: WikiText-2


def prepare(args) -> int:
    from importlib.metadata import version

    from evaluators.data import data_root
    from space.models import load_model

    if PREPARED.exists():
        shutil.rmtree(PREPARED)
    model = PREPARED / "model"
    loaded = load_model(args.model)  # the bundled GGUF, de-quantised once into the cache
    loaded.model.config.save_pretrained(model)
    loaded.tokenizer.save_pretrained(model)
    for name in TEXTS:
        shutil.copytree(data_root() / name, PREPARED / "data" / name)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                   "manylinux2014_x86_64", "any")],
                    "-d", str(PREPARED / "wheels"), *pins], check=True)
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file())
    print(f"{PREPARED}: {size / 2**20:.1f} MiB ({', '.join(pins)})")
    return 0


def random_model(folder: Path, out: Path) -> Path:
    """The model of ``folder``'s config with random bfloat16 weights (scale.py's, seed 0), saved at ``out``."""
    from transformers import AutoConfig, AutoTokenizer

    from experiments.scale import build

    build(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def run(args) -> int:
    import torch

    from evaluators.environment import environment, matmul_tflops
    from search.config import SearchConfig
    from search.job import run_search
    from search.plan import plan_for

    os.environ.setdefault("LLM_PRUNER_DATA", str(args.prepared / "data"))
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"environment": environment(), "device": args.device}
    cuda = args.device.startswith("cuda")
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
        result["bf16_tflops"] = round(matmul_tflops(torch.bfloat16, size=8192, device=args.device), 1)
        started = time.time()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT)
        (args.out / "gpu_tests.log").write_text(tests.stdout + tests.stderr)
        result["gpu_tests"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:],
                               "seconds": round(time.time() - started, 1)}
        print("CUDA tests:", result["gpu_tests"], flush=True)
    model = random_model(args.prepared / "model", Path(args.workdir) / "smollm2-random")
    result["searches"] = []
    for solver_device in args.solver_devices:
        config = SearchConfig.create(str(model), args.ratio, device=args.device, trials=args.trials,
                                     solver_device=solver_device, eval_windows=args.eval_windows, **SIZES[args.sizes])
        run_dir = Path(args.workdir) / f"search-{solver_device}"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.time()
        best = run_search(config, run_dir, progress=False).best
        plan = plan_for(config, run_dir=run_dir)
        row = {"solver_device": solver_device, "trials": args.trials, "wall_seconds": round(time.time() - started, 1),
               "seconds": best["seconds"], "seconds_per_candidate": plan["seconds_per_candidate"],
               "measured_trials": plan["measured_trials"], "plan_peak_bytes": plan["peak_bytes"],
               "plan": {k: v for k, v in plan.items() if k.endswith("_bytes")},
               "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
               "test_ppl": best["test"]["ppl"]}
        result["searches"].append(row)
        print(json.dumps({k: row[k] for k in ("solver_device", "seconds_per_candidate", "plan_peak_bytes",
                                              "peak_allocated_bytes", "wall_seconds")}), flush=True)
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="here: the model's config and tokenizer, the texts, the wheels into .device/")
    p.add_argument("--model", default="smollm2-135m")
    r = sub.add_parser("run", help="there: the CUDA tests and the searches")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--prepared", type=Path, default=PREPARED)
    r.add_argument("--workdir", default="/tmp/device_check")
    r.add_argument("--device", default="cuda")
    r.add_argument("--ratio", type=float, default=0.7)
    r.add_argument("--trials", type=int, default=32, help="children of the staged evolution (16 a generation)")
    r.add_argument("--eval-windows", type=int, default=8)
    r.add_argument("--solver-devices", nargs="+", default=["model", "cpu"])
    r.add_argument("--sizes", default="default", choices=list(SIZES))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
