"""The model package's metadata files (docs/FORMATS.md): config, tokenizer, generation defaults, manifest.

    model.onnx              written by the graph steps before this
    model.onnx.data         a large graph's weights (ONNX external data: export/external_data.py)
    config.json             ModelConfig + the graph's input/output contract
    tokenizer.json          the checkpoint's tokenizer
    generation_config.json  sampling and stopping defaults
    manifest.json           versions, sha256 of every other file, precision, quantization, the KV
                            cache's precision (and an int8 cache's calibration), census,
                            verification and quality gates (and with --draft, the draft's entry)
    draft/                  with --draft: the draft's own complete package (export/draft.py)

The manifest is written last, over the files as they are on disk, so its hashes describe exactly
what the package holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from tokenizers import Tokenizer

import edgegpt
from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, MANIFEST, MODEL, MODEL_DATA, TOKENIZER
from edgegpt.core.io import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from edgegpt.tokenizer import end_of_text_id

PACKAGE_FILES = (MODEL, CONFIG, TOKENIZER, GENERATION_CONFIG, MANIFEST)
# What an imported model brings along, and a large graph's weights (export/external_data.py; docs/FORMATS.md).
OPTIONAL_FILES = (CHAT_TEMPLATE, MODEL_DATA)
# The checkpoint's own generation_config.json (an imported model's) overrides these defaults.
SOURCE_GENERATION_KEYS = ("eos_token_id", "bos_token_id", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                          "repetition_penalty")

PACKAGE_FORMAT = "edgegpt-package"
FORMAT_VERSION = 1

# Sampling defaults: temperature 0.8 with top-k 50 / top-p 0.95 is the usual middle ground between
# repetitive greedy text and incoherent full-temperature sampling for small models.
SAMPLING_DEFAULTS: dict[str, Any] = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def generation_config(tokenizer: Tokenizer, checkpoint: Path | None = None) -> dict[str, Any]:
    """The package's generation_config.json: edgegpt's sampling defaults and the tokenizer's end-of-text
    id, overridden by what the checkpoint's own generation_config.json says (an imported model's eos ids,
    bos id and the sampling its authors chose)."""
    source = read_json(Path(checkpoint) / GENERATION_CONFIG) if checkpoint and (
        Path(checkpoint) / GENERATION_CONFIG).is_file() else {}
    if not isinstance(source, dict):
        raise EdgeGPTError(f"{Path(checkpoint) / GENERATION_CONFIG}: expected a JSON object")
    given = {key: source[key] for key in SOURCE_GENERATION_KEYS if source.get(key) is not None}
    eos = given.pop("eos_token_id", None)
    if eos is None:
        eos = end_of_text_id(tokenizer)
    if source.get("do_sample") is False:
        # The authors asked for greedy decoding (what transformers' generate() does with do_sample false,
        # whatever temperature the file also lists): temperature 0 is edgegpt's greedy.
        given["temperature"] = 0.0
    return {**SAMPLING_DEFAULTS, **given, "eos_token_id": eos}


def versions() -> dict[str, str]:
    import onnxscript

    return {
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "torch": torch.__version__,
    }


def write_package_metadata(directory: Path, *, cfg: ModelConfig, tokenizer: Tokenizer, graph: dict[str, Any],
                           checkpoint: Path | None = None) -> None:
    """Write config.json, tokenizer.json, generation_config.json (and the checkpoint's chat template, if it
    has one) beside model.onnx: after this the directory loads in the runtime (the manifest is not needed
    to run), so the gates can score it."""
    directory = Path(directory)
    write_json_atomic(directory / CONFIG, {"format": PACKAGE_FORMAT, "model": cfg.to_dict(), "graph": graph})
    write_bytes_atomic(directory / TOKENIZER, tokenizer.to_str().encode())
    write_json_atomic(directory / GENERATION_CONFIG, generation_config(tokenizer, checkpoint))
    if checkpoint is not None and (Path(checkpoint) / CHAT_TEMPLATE).is_file():
        write_bytes_atomic(directory / CHAT_TEMPLATE, (Path(checkpoint) / CHAT_TEMPLATE).read_bytes())


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """The manifest's `files`: the sha256 of each named file of `directory`."""
    return {name: sha256_file(Path(directory) / name) for name in names}


def write_manifest(directory: Path, manifest_fields: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json last, over the files as they are on disk; returns the manifest.

    `manifest_fields` carries opset, ir_version, graph, precision, quantization, kv_cache (the cache's
    dtype; for int8 its quantization and calibration: export/cache_precision.py), operator_census,
    verification and gates, and with a draft its entry (export/draft.py), whose folder is the only
    directory the package may hold: its files are hashed in that entry, not in `files`.
    """
    directory = Path(directory)
    draft = manifest_fields.get("draft")
    folders = {draft["directory"]} if draft else set()
    everything = sorted(p.name for p in directory.iterdir())
    present = [name for name in everything if name not in folders]
    expected = sorted(set(PACKAGE_FILES) - {MANIFEST})
    if (sorted(set(present) - set(OPTIONAL_FILES)) != expected or not all((directory / n).is_file() for n in present)
            or not all((directory / f).is_dir() for f in folders)):
        raise RuntimeError(f"package staging directory holds unexpected files: {everything}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "edgegpt_version": edgegpt.__version__,
        "versions": versions(),
        **manifest_fields,
        "files": file_hashes(directory, present),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest
