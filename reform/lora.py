"""Optional LoRA recovery of an export, as LLM-Pruner and AdaPruner do after pruning.

LoRA adapters (``peft``) on the export's linears are trained on calibration text (a validation or
train split, never test) with the next-token loss, merged into the weights, and the model is
written back in the export format: the same modelling file, per-layer config and tokenizer, and a
``subnet.json`` that records the recovery. Sized for a CPU: a few hundred short windows at most.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from evaluators.data import CalibrationSpec
from space.errors import UserError
from space.export import SUBNET_FILE, check_destination, read_subnet_record, staged_folder, write_json
from space.models import load_model

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UserError(f"LoRA needs rank, epochs and batch size >= 1 and lr > 0, got {self}")


def train_lora(model, windows: torch.Tensor, spec: LoraSpec, *, progress: Callable = lambda it, **_: it):
    """Train LoRA adapters on ``windows`` and merge them; return the merged model and the mean
    loss of each epoch."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                        target_modules=[t for t in spec.targets if t in present], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=spec.lr)
    peft_model.train()
    losses = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(spec.epochs):
        order = torch.randperm(windows.shape[0], generator=generator)
        total, count = 0.0, 0
        for start in progress(range(0, len(order), spec.batch_size), desc="LoRA"):
            ids = windows[order[start : start + spec.batch_size]]
            logits = peft_model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * ids.shape[0], count + ids.shape[0]
        losses.append(total / count)
        log.info("LoRA epoch %d: mean loss %.4f", len(losses), losses[-1])
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, losses


def recover_export(export_dir: Path, *, lora: LoraSpec, calibration: CalibrationSpec, out_dir: Path,
                   environment: dict | None = None, progress: Callable = lambda it, **_: it) -> dict:
    """Recover the export in ``export_dir`` with LoRA on ``calibration`` and write it to ``out_dir``
    (which may be ``export_dir`` itself); return the recovery record (``environment``: what the
    caller records about the machine, :func:`evaluators.environment.environment`)."""
    record = read_subnet_record(export_dir)
    check_destination(out_dir)
    started = time.time()
    loaded = load_model(str(export_dir), dtype=torch.float32)
    windows = calibration.windows(loaded.tokenizer)
    merged, losses = train_lora(loaded.model, windows, lora, progress=progress)
    if not all(math.isfinite(x) for x in losses):
        raise UserError(f"LoRA training diverged (losses {losses}); lower --lr")
    with staged_folder(Path(out_dir)) as staging:
        shutil.copytree(export_dir, staging, dirs_exist_ok=True)  # modelling file, tokenizer, records
        for old in staging.glob("*.safetensors*"):
            old.unlink()
        merged.save_pretrained(staging)
        recovery = {"method": "lora", **asdict(lora), "calibration": calibration.to_dict(), "epoch_losses": losses,
                    "seconds": round(time.time() - started, 3), "recovered_from": str(export_dir),
                    "environment": environment}
        write_json(staging / SUBNET_FILE, {**record, "recovery": recovery})
    return recovery
