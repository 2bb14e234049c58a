"""The checkpoint directory: what `train` writes and `export` reads.

    model.safetensors        weights (the tied LM head stored once, as the embedding)
    config.json              ModelConfig
    tokenizer.json           Hugging Face tokenizers format
    generation_config.json   optional, an imported model's: eos id(s), bos id, sampling defaults
    chat_template.jinja      optional, an imported model's chat template
    train_state.*            optimizer and progress, for --resume (see edgegpt.train.loop)

safetensors and JSON only: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import atomic_path, read_json, write_bytes_atomic, write_json_atomic
from edgegpt.model import GPT, state_dict_for_saving
from edgegpt.tokenizer import load_tokenizer


def save_weights(path: Path, model: GPT) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file(state_dict_for_saving(model), str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:  # how safetensors reports a failed write (a full disk): an I/O error
            raise OSError(str(e)) from None


def save_checkpoint(directory: Path, model: GPT, tokenizer: Tokenizer, *, generation: dict[str, Any] | None = None,
                    chat_template: str | None = None) -> None:
    """Write weights, config and tokenizer, and an imported model's generation config and chat template
    when given; each file is replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory / WEIGHTS, model)
    model.cfg.save(directory / CONFIG)
    write_bytes_atomic(directory / TOKENIZER, tokenizer.to_str().encode())
    if generation is not None:
        write_json_atomic(directory / GENERATION_CONFIG, generation)
    if chat_template is not None:
        write_bytes_atomic(directory / CHAT_TEMPLATE, chat_template.encode())


def read_generation_config(directory: Path) -> dict[str, Any] | None:
    """The checkpoint's generation_config.json (an imported model's), or None when it has none."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise EdgeGPTError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_chat_template(directory: Path) -> str | None:
    """The checkpoint's chat_template.jinja, or None when it has none."""
    path = Path(directory) / CHAT_TEMPLATE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeGPTError(f"{path} is not UTF-8 text; it is not a chat template") from None


def require_checkpoint(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgeGPTError(f"no checkpoint at {directory}; run `edgegpt train` first or pass a checkpoint directory")
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (directory / name).is_file():
            raise EdgeGPTError(f"{directory} is not a complete checkpoint: {name} is missing")
    return directory


def read_weights(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against what a model of `cfg` stores (names, shapes, finite values)."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgeGPTError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt") from None
    expected = expected_shapes(cfg)
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise EdgeGPTError(f"{path}: config and weights disagree ({detail})")
    for name, tensor in weights.items():
        if tensor.shape != expected[name]:
            raise EdgeGPTError(
                f"{path}: config and weights disagree ({name} is {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name])})"
            )
        # Checked at load, before any command prints progress: later it surfaces as NaN logits deep inside
        # an export or an evaluation, after lines of output. In slices: a whole-tensor isfinite would be a
        # quarter of the largest tensor again.
        slices = tensor.reshape(-1).split(1 << 22)
        if tensor.is_floating_point() and not all(torch.isfinite(part).all() for part in slices):
            raise EdgeGPTError(f"{path}: {name} holds NaN or infinite values; the checkpoint is corrupt "
                               "(did training diverge?), retrain or use an earlier checkpoint")
    return weights


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every weight a checkpoint of `cfg` stores, with its shape (a tied LM head is stored as the embedding)."""
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in state_dict_for_saving(GPT(cfg)).items()}


def load_checkpoint(directory: Path, dropout: float = 0.0) -> tuple[GPT, Tokenizer]:
    """Model (eval mode, fp32, CPU) and tokenizer from a checkpoint directory, validated."""
    directory = require_checkpoint(directory)
    cfg = ModelConfig.load(directory / CONFIG)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise EdgeGPTError(
            f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {cfg.vocab_size}"
        )
    # The model's parameters are the tensors read (GPT.holding): loading holds the weights once.
    model = GPT.holding(cfg, read_weights(directory / WEIGHTS, cfg), dropout=dropout)
    return model.eval(), tokenizer
