"""Export a subnet as a Hugging Face folder that loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, or without remote code
when every layer has the same widths.

The folder holds physically sliced safetensors, ``config.json`` (the source config plus the
upstream ``per_layer_config`` widths, ``head_dim`` pinned, and an ``auto_map`` to our modelling
file; for a uniform subnet without output biases, the family's own config with its widths),
``modeling_llm_pruner.py`` (heterogeneous exports only), the tokenizer, and ``subnet.json`` (widths,
kept unit indices in the source model's numbering, the source, the recipe, metrics, which config).

The folder is written next to its destination and renamed into place only when complete, so a
failure or an interruption leaves either the old folder or the new one, never a mixture. A
destination that exists and is not an export of ours is refused before anything is computed
(:func:`check_destination`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from space.adapters import ModelAdapter, family
from space.errors import UserError
from space.export.atomic import staged_folder, write_json
from space.export.config import is_uniform, pruned_config, stock_config
from space.export.state import sliced_state_dict
from space.models import ModelSource
from space.modeling_llm_pruner import PRUNED_CLASSES
from space.order import LayerOrder
from space.subnet import Subnet

SUBNET_FILE = "subnet.json"


def check_destination(out_dir: Path) -> None:
    """Refuse a destination that exists and is neither empty nor an export of ours (missing parent
    folders are created by the export)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not (out_dir / SUBNET_FILE).is_file():
        raise UserError(f"{out_dir} exists and is not an llm-pruner export (no {SUBNET_FILE}); choose another --out")


def export_subnet(
    adapter: ModelAdapter,
    subnet: Subnet,
    orders: list[LayerOrder],
    out_dir: Path,
    *,
    tokenizer=None,
    metadata: dict | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the pruned model of ``subnet`` (the adapter's model is permuted by ``orders``);
    ``overrides`` replace kept slices (rectified weights) or add compensation biases."""
    out_dir = Path(out_dir)
    check_destination(out_dir)
    started = time.time()
    output_bias = any(k.endswith(("o_proj.bias", "down_proj.bias")) for k in overrides or {})
    stock = is_uniform(subnet) and not output_bias  # a stock config says it: no remote code to load it
    if stock:
        config = stock_config(adapter.config, subnet, dtype=dtype)
        with torch.device("meta"):
            pruned = AutoModelForCausalLM.from_config(config)
    else:
        config = pruned_config(adapter.config, subnet, dtype=dtype, output_bias=output_bias)
        with torch.device("meta"):
            pruned = PRUNED_CLASSES[family(adapter.config.model_type)][1](config)
    # Saved from host memory: the kept slices of a model on an accelerator are copied once.
    state = {k: v.cpu() for k, v in sliced_state_dict(adapter, subnet, overrides=overrides, dtype=dtype).items()}
    if output_bias:  # every o_proj/down_proj of the export has a bias; zero where none was given
        for name, module in pruned.named_modules():
            if name.endswith(("o_proj", "down_proj")) and module.bias is not None and f"{name}.bias" not in state:
                state[f"{name}.bias"] = torch.zeros(module.out_features, dtype=state[f"{name}.weight"].dtype)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"export state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        pruned.tie_weights()
    if not stock:
        type(pruned).register_for_auto_class("AutoModelForCausalLM")
        type(config).register_for_auto_class("AutoConfig")

    with staged_folder(out_dir) as staging:
        pruned.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        record = {
            "format": "llm-pruner subnet v1",
            "model_type": config.model_type,
            # stock: the family's own config, loads without trust_remote_code; per-layer: our
            # modelling file (per_layer_config), loads with trust_remote_code=True
            "config": "stock" if stock else "per-layer",
            "subnet": subnet.to_dict(),
            "kept": [order.kept(widths) for order, widths in zip(orders, subnet.layers)],
            "export_seconds": round(time.time() - started, 3),
            **(metadata or {}),
        }
        write_json(staging / SUBNET_FILE, record)
    return out_dir


def record_header(source: ModelSource, subnet: Subnet, target_ratio: float | None) -> dict:
    """The first fields of every ``subnet.json``: where the dense model came from, the budget asked
    for and the ratios reached."""
    return {
        "source": source.to_dict(),
        "target_ratio": target_ratio,
        "block_ratio": subnet.ratio(),
        "total_ratio": subnet.total_ratio(),
    }


def read_subnet_record(folder: Path) -> dict:
    path = Path(folder) / SUBNET_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an llm-pruner export (no {SUBNET_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def update_subnet_record(folder: Path, **fields) -> None:
    """Add fields (e.g. metrics measured after export) to an export's ``subnet.json``."""
    record = read_subnet_record(folder)
    record.update(fields)
    write_json(Path(folder) / SUBNET_FILE, record)
