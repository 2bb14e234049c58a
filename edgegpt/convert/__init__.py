"""`edgegpt convert SOURCE OUT`: models in and out of edgegpt's checkpoint format.

    FILE.gguf (llama.cpp, Llama architecture) ──────────────────► checkpoint      gguf.py (+ gguf_tokenizer.py)
    Hugging Face folder (Llama, SmolLM, Mistral, Qwen2) ◄───────► checkpoint      huggingface.py

The direction is told apart by what SOURCE is. Every check (the source, what it holds, the destination)
runs before anything is written, and the output is built beside OUT and swapped in whole, so a refused
or failed conversion leaves nothing behind and never half of a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgegpt.convert.gguf import GGUF_SUFFIX, from_gguf, is_gguf
from edgegpt.convert.huggingface import (
    HF_FILES,
    _translate,
    config_from_hf,
    from_huggingface,
    hf_config,
    to_huggingface,
)
from edgegpt.convert.weights import TensorProgress
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import read_json

__all__ = ["HF_FILES", "_translate", "check_destination", "config_from_hf", "convert", "from_gguf",
           "from_huggingface", "hf_config", "to_huggingface"]


def _config(directory: Path) -> Any:
    """config.json's content; None where there is none or it is not JSON (a destination is only looked at)."""
    try:
        return read_json(directory / CONFIG) if (directory / CONFIG).is_file() else None
    except EdgeGPTError:
        return None


def _is_checkpoint(directory: Path, config: Any) -> bool:
    """An edgegpt checkpoint: weights, tokenizer and a config.json that is not a Hugging Face one."""
    has_files = all((directory / name).is_file() for name in (WEIGHTS, CONFIG, TOKENIZER))
    return has_files and not (isinstance(config, dict) and "model_type" in config)


def _is_hf_model(config: Any) -> bool:
    return isinstance(config, dict) and "model_type" in config


def check_destination(source: Path, out: Path, to_hf: bool) -> None:
    """Refuse to replace anything but a previous output of the same kind: the staged swap deletes what was there.

    export's check_destination rule: never the source or a folder holding it; an empty or new directory
    is fine; an existing edgegpt checkpoint (converting to a checkpoint), or a Hugging Face directory
    holding nothing but the files a conversion writes (converting to Hugging Face), may be replaced;
    anything else is refused."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise EdgeGPTError(f"convert destination {out} would overwrite the source {source}; "
                           "choose another output directory")
    if out.exists() and not out.is_dir():
        raise EdgeGPTError(f"convert destination {out} is a file; choose a directory path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    config = _config(out)
    if to_hf:
        previous = _is_hf_model(config) and all(p.name in HF_FILES and p.is_file() for p in out.iterdir())
    else:
        previous = _is_checkpoint(out, config)
    if not previous:
        raise EdgeGPTError(f"convert destination {out} already exists and is not empty; choose a new directory")


def convert(source: Path, out: Path, progress: TensorProgress | None = None) -> tuple[str, Path]:
    """Any supported direction, told apart by what `source` is. Returns (direction, out). Into a checkpoint,
    progress(done, total) is called as each tensor is read (a checkpoint is written out in one step).

    Before anything is written, the destination is checked (check_destination): never the source or a
    folder holding it, never an existing directory holding anything but a previous output of that kind."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise EdgeGPTError(f"{source} does not exist, so it is neither a .gguf file nor a Hugging Face model "
                           "directory nor an edgegpt checkpoint")
    if source.is_file():
        if not is_gguf(source):
            raise EdgeGPTError(f"{source} is not a GGUF file (it does not start with the GGUF magic bytes); "
                               "convert reads .gguf files, Hugging Face model directories and edgegpt checkpoints")
        check_destination(source, out, to_hf=False)
        return "gguf → checkpoint", from_gguf(source, out, progress)
    config = read_json(source / CONFIG) if (source / CONFIG).is_file() else None  # corrupt JSON: say so
    if _is_checkpoint(source, config):
        check_destination(source, out, to_hf=True)
        return "checkpoint → huggingface", to_huggingface(source, out)
    if _is_hf_model(config):
        check_destination(source, out, to_hf=False)
        return "huggingface → checkpoint", from_huggingface(source, out, progress)
    ggufs = sorted(p.name for p in source.glob(f"*{GGUF_SUFFIX}"))
    hint = f" (for a GGUF model, pass the file itself: {source / ggufs[0]})" if ggufs else ""
    raise EdgeGPTError(f"{source} is neither an edgegpt checkpoint nor a Hugging Face model directory{hint}")
