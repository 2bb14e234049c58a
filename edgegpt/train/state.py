"""Saving and restoring everything --resume needs, as one atomic file.

`train_state.safetensors` holds the latest weights and the optimizer's moments as tensors, and the
progress (step, elapsed time, best validation loss, options, data key) as JSON in its metadata, so
weights and progress can never disagree after a crash. `train_state.json` is a readable copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import TRAIN_STATE, TRAIN_STATE_WEIGHTS
from edgegpt.core.io import atomic_path, write_json_atomic
from edgegpt.model import GPT, state_dict_for_saving


def save_train_state(directory: Path, model: GPT, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in state_dict_for_saving(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optimizer.{names[id(p)]}.{key}"] = value.detach().contiguous().cpu()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(Path(directory) / TRAIN_STATE_WEIGHTS) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"train_state": json.dumps(progress)})
        except SafetensorError as e:  # how safetensors reports a failed write (a full disk): an I/O error
            raise OSError(str(e)) from None
    write_json_atomic(Path(directory) / TRAIN_STATE, progress)


def read_progress(directory: Path) -> dict[str, Any]:
    path = Path(directory) / TRAIN_STATE_WEIGHTS
    if not path.is_file():
        raise EdgeGPTError(
            f"nothing to resume in {directory}: {TRAIN_STATE_WEIGHTS} is missing; train without --resume"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["train_state"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise EdgeGPTError(f"{path} is corrupt ({e}); train without --resume to start over") from None


def load_train_state(directory: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights and optimizer moments in place (progress comes from read_progress)."""
    path = Path(directory) / TRAIN_STATE_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=not model.cfg.tie_embeddings)
    params = dict(model.named_parameters())
    for name, p in params.items():
        prefix = f"optimizer.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        # AdamW keeps its step counter on the CPU; only the moments follow the parameter's device.
        state = {k: v if k == "step" else v.to(p.device) for k, v in state.items()}
        if state:
            optimizer.state[p] = state
