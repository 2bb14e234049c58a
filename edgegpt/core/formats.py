"""The file names of edgegpt's formats, in one place (docs/FORMATS.md describes what each holds).

A checkpoint directory and a model package share config.json and tokenizer.json; the names are Hugging
Face's too, so a checkpoint converts to and from a transformers directory file for file.
"""

from __future__ import annotations

from pathlib import Path

# Both: the model's hyperparameters and the Hugging Face tokenizer.
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"

# A checkpoint directory (`edgegpt train`).
WEIGHTS = "model.safetensors"
TRAIN_STATE_WEIGHTS = "train_state.safetensors"  # optimizer and RNG tensors, for --resume
TRAIN_STATE = "train_state.json"  # step, options, data position
# `edgegpt train --lora`: the adapters alone, in PEFT's layout (edgegpt.train.lora), in this folder of the checkpoint.
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# A model package directory (`edgegpt export`).
MODEL = "model.onnx"
MODEL_DATA = "model.onnx.data"  # a large model.onnx's weights (ONNX external data), beside it
GENERATION_CONFIG = "generation_config.json"
MANIFEST = "manifest.json"

# Both, optional: Hugging Face's generation_config.json (the end-of-text id or ids, the beginning-of-text
# id, sampling defaults) and the chat template (Jinja, as Hugging Face's `chat_template`). An imported model
# brings them into its checkpoint and export carries them into the package.
CHAT_TEMPLATE = "chat_template.jinja"


def is_package(directory: str | Path) -> bool:
    """Whether a directory holds a model package (it has model.onnx)."""
    return (Path(directory) / MODEL).is_file()


def is_checkpoint(directory: str | Path) -> bool:
    """Whether a directory holds a checkpoint (it has model.safetensors)."""
    return (Path(directory) / WEIGHTS).is_file()


def plan_grid(plan: dict[str, int]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """A quantization plan from manifest.json ({projection weight name: bits, 0 = float32}) as a grid:
    (matrix columns, rows of (layer, bits per column)), for the export report and `edgegpt info`."""
    columns: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for name, bits in plan.items():
        parts = name.removesuffix(".transposed").removesuffix(".weight").split(".")
        layer = ".".join(parts[:2]) if parts[0] == "layers" and len(parts) > 2 else "model"
        matrix = parts[-1].removesuffix("_proj")
        if matrix not in columns:
            columns.append(matrix)
        rows.setdefault(layer, {})[matrix] = "f32" if bits == 0 else str(bits)
    return columns, [(layer, [cells.get(c, "") for c in columns]) for layer, cells in rows.items()]
