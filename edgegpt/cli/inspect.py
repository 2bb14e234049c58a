"""`edgegpt info`: what a checkpoint or a model package holds, read without torch or onnxruntime."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, MANIFEST, MODEL, TRAIN_STATE, WEIGHTS, is_checkpoint, is_package, plan_grid
from edgegpt.core.io import read_json


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte length, then JSON): shapes without loading weights."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise EdgeGPTError(f"{path} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise EdgeGPTError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if name != "__metadata__" and not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            raise EdgeGPTError(f"{path} is not a readable safetensors file (tensor {name!r:.80} has no shape)")
    return header


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object: a damaged one is a one-line error, not a crash while drawing."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise EdgeGPTError(f"{path}: expected a JSON object, got {type(data).__name__}; the file is corrupt")
    return data


def _section(data: dict[str, Any], key: str, source: Path) -> dict[str, Any]:
    """data[key] as an object ({} when absent or null)."""
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise EdgeGPTError(f"{source}: {key!r} must be an object, got {type(value).__name__}; the file is corrupt")
    return value


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:,.2f} MB"


def _files_table(directory: Path) -> Table:
    table = Table(title="files", show_header=True)
    table.add_column("file")
    table.add_column("size", justify="right")
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        table.add_row(path.name, _size(path))
    return table


def _model_table(model: dict[str, Any], title: str) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in model.items():
        table.add_row(key, str(value))
    return table


def describe_checkpoint(directory: Path) -> Group:
    config = read_object(directory / CONFIG)
    header = safetensors_header(directory / WEIGHTS)
    parameters = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            parameters += count
    parts = [f"[bold]checkpoint[/] {directory}  ({parameters / 1e6:.2f}M parameters)",
             _model_table(config, "model config")]
    state_path = directory / TRAIN_STATE
    if state_path.is_file():
        state = read_object(state_path)
        best = _section(state, "best_val", state_path)
        progress = Table(title="training", show_header=False)
        progress.add_row("steps", str(state.get("step")))
        progress.add_row("elapsed", f"{state.get('elapsed_s', 0) / 60:.1f} min")
        progress.add_row("stopped", str(state.get("stopped")))
        progress.add_row("best validation", f"{best.get('loss', float('nan')):.4f} nats/token, "
                         f"{best.get('nats_per_char', float('nan')):.4f} nats/char at step {best.get('step')}")
        progress.add_row("data", ", ".join(state.get("data") or ["(embedded Python documentation)"]))
        parts.append(progress)
    parts.append(_files_table(directory))
    return Group(*parts)


def describe_package(directory: Path) -> Group:
    config_path, manifest_path = directory / CONFIG, directory / MANIFEST
    config = read_object(config_path)
    manifest = read_object(manifest_path) if manifest_path.is_file() else {}
    graph = manifest.get("graph") or _section(config, "graph", config_path).get("kv_layout", "?")
    cache = _kv_cache(config, manifest, config_path, manifest_path)
    parts = [f"[bold]model package[/] {directory}  (format {manifest.get('format_version', '?')}, "
             f"{graph} graph, {manifest.get('precision', '?')}, {cache.get('dtype', '?')} KV cache)",
             _model_table(_section(config, "model", config_path), "model config")]
    versions = Table(title="built with", show_header=False)
    for key, value in {**_section(manifest, "versions", manifest_path), "opset": manifest.get("opset"),
                       "ir_version": manifest.get("ir_version")}.items():
        versions.add_row(key, str(value))
    parts.append(versions)
    quantization = _section(manifest, "quantization", manifest_path)
    if quantization:
        plan = quantization.get("plan") or {}
        summary = {k: v for k, v in quantization.items() if k not in ("plan", "search")}
        parts.append(_model_table(summary, "quantization"))
        if len(set(plan.values())) > 1:
            parts.append(plan_table(plan))
    parts.append(_cache_table(cache, _section(config, "model", config_path)))
    census = _section(manifest, "operator_census", manifest_path)
    if census:
        ops = Table(title=f"operators ({sum(census.values())} nodes)", show_header=True)
        ops.add_column("op type")
        ops.add_column("count", justify="right")
        for op, count in sorted(census.items(), key=lambda kv: -kv[1]):
            ops.add_row(op, str(count))
        parts.append(ops)
    verification = manifest.get("verification")
    if verification:
        checks = Table(title="float32 graph vs PyTorch", show_header=False)
        for key, value in _flatten(verification):
            checks.add_row(key, value)
        parts.append(checks)
    gates = _section(manifest, "gates", manifest_path)
    if gates:
        parts.append(_gates_table(gates))
    parts.append(_files_table(directory))
    draft = _section(manifest, "draft", manifest_path)
    if draft:
        parts.append(_draft_table(directory, draft))
    return Group(*parts)


def _draft_table(directory: Path, draft: dict[str, Any]) -> Table:
    """The draft model for speculative decoding (manifest.json's `draft` entry, export/draft.py): where it is,
    how large, and how often its greedy choice agreed with this model's on held-out text."""
    name = draft.get("directory")
    folder = directory / name if isinstance(name, str) and name else None
    table = Table(title="draft model (speculative decoding)", show_header=False)
    table.add_row("folder", f"{name}/" if folder is None or folder.is_dir() else f"{name}/ (MISSING)")
    if folder is not None and folder.is_dir():
        files = [p for p in folder.iterdir() if p.is_file()]
        if (folder / MODEL).is_file():
            table.add_row("size", f"{_size(folder / MODEL)} model.onnx, "
                          f"{sum(p.stat().st_size for p in files) / 1e6:,.2f} MB in all")
        own = read_object(folder / MANIFEST) if (folder / MANIFEST).is_file() else {}
        if own:
            table.add_row("graph", f"{own.get('graph', '?')}, {own.get('precision', '?')}")
    parameters = draft.get("parameters")
    if isinstance(parameters, int):
        table.add_row("parameters", f"{parameters / 1e6:.2f}M")
    if draft.get("max_len") is not None:
        table.add_row("context", f"{draft['max_len']} tokens")
    acceptance, tokens = draft.get("acceptance"), draft.get("acceptance_tokens")
    if isinstance(acceptance, (int, float)) and isinstance(tokens, int):
        table.add_row("acceptance", f"{acceptance:.1%} of {tokens:,} held-out tokens (its greedy choice is this "
                      "model's)")
    else:
        table.add_row("acceptance", "not measured")
    table.add_row("exported from", str(draft.get("checkpoint", "?")))
    return table


def plan_table(plan: dict[str, int]) -> Table:
    columns, rows = plan_grid(plan)
    table = Table(title="quantization plan (bits per projection; f32 = float32)")
    table.add_column("layer")
    for column in columns:
        table.add_column(column, justify="right")
    for layer, cells in rows:
        table.add_row(layer, *cells)
    return table


def _kv_cache(config: dict[str, Any], manifest: dict[str, Any], config_path: Path, manifest_path: Path
              ) -> dict[str, Any]:
    """The cache's precision as the manifest records it (with its calibration), else config.json's graph
    block says it (packages from before `kv_cache` existed: the graph's dtype)."""
    recorded = _section(manifest, "kv_cache", manifest_path)
    if recorded:
        return recorded
    graph = _section(config, "graph", config_path)
    return _section(graph, "kv_cache", config_path) or ({"dtype": graph["dtype"]} if "dtype" in graph else {})


# Bytes per cached value by cache dtype (runtime/package.py has the same table; this module stays
# independent of the runtime, which imports onnxruntime).
_CACHE_ITEM_BYTES = {"float32": 4, "float16": 2, "int8": 1}


def _cache_table(cache: dict[str, Any], model: dict[str, Any]) -> Table:
    """The KV cache: its dtype, bytes per token, and for int8 how it is quantized and was calibrated."""
    table = Table(title="KV cache", show_header=False)
    table.add_row("dtype", str(cache.get("dtype", "?")))
    try:
        per_token = 2 * model["n_layers"] * model["n_kv_heads"] * (model["dim"] // model["n_heads"]) \
            * _CACHE_ITEM_BYTES[cache["dtype"]]
        table.add_row("bytes per token", f"{per_token:,}")
    except (KeyError, TypeError, ZeroDivisionError):
        pass  # a damaged config: the model table above shows what is there
    if cache.get("quantization"):
        table.add_row("quantization", f"{cache['quantization']}, {cache.get('bit_width', '?')}-bit symmetric")
    calibration = cache.get("calibration")
    if isinstance(calibration, dict):
        tokens = calibration.get("tokens", "?")
        tokens = f"{tokens:,}" if isinstance(tokens, int) else str(tokens)
        table.add_row("calibrated on", f"{tokens} tokens of {calibration.get('source', '?')}, "
                      f"margin {calibration.get('margin', '?')}")
        for kind in ("k", "v"):
            maxima = calibration.get(f"max_abs_{kind}")
            if isinstance(maxima, list) and maxima and all(isinstance(m, (int, float)) for m in maxima):
                table.add_row(f"max |{kind.upper()}| per layer", f"{min(maxima):.3g} .. {max(maxima):.3g}")
    return table


def _gates_table(gates: dict[str, Any]) -> Table:
    """The export's quality gates as recorded: every check, then each scored model's figures."""
    state = "on" if gates.get("enabled") else "OFF (exported with --no-gate)"
    verdict = "passed" if gates.get("passed") else "FAILED"
    table = Table(title=f"quality gates ({state}): {verdict}", show_header=False)
    for check in gates.get("checks", []):
        value = check["value"]
        shown = f"{value:+.2%} (limit {check['limit']:+.2%})" if check.get("unit") == "relative" else \
            f"{value:.2e} (limit {check['limit']:.2e})"
        table.add_row(check["name"], f"{shown} {'PASS' if check.get('passed') else 'FAIL'}")
    evaluated = gates.get("eval")
    if evaluated:
        capped = ", capped" if evaluated.get("capped") else ""
        table.add_row("held-out text", f"{evaluated['tokens']:,} tokens of {evaluated['source']}{capped}")
    for model in gates.get("models", []):
        agreement = ""
        if model.get("top1_agreement") is not None:
            agreement = f", top-1 agreement {model['top1_agreement']:.1%}, greedy {model['greedy_agreement']:.1%}"
        table.add_row(model["name"], f"{model['nats_per_token']:.4f} nats/token, {model['nats_per_char']:.4f} "
                      f"nats/char, perplexity {model['perplexity']:.3f}{agreement}")
    return table


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        rows = []
        for key, inner in value.items():
            rows.extend(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    return [(prefix, f"{value:.3g}" if isinstance(value, float) else json.dumps(value))]


def describe(directory: Path) -> Group:
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgeGPTError(f"{directory} is not a directory; pass a checkpoint or a model package")
    if is_package(directory):
        return describe_package(directory)
    if is_checkpoint(directory):
        return describe_checkpoint(directory)
    raise EdgeGPTError(f"{directory} is neither a checkpoint (model.safetensors) nor a model package (model.onnx)")
