"""`edgegpt export`: checkpoint directory -> model package directory.

    checkpoint/ ─► build graph (float32) ─► verify vs PyTorch ─► [quantize ─► verify] ─► write package ─► model/

Every step works inside a staging directory beside the destination, swapped in only when all steps
succeeded: a failed export leaves no half package and keeps the previous one intact.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.table import Table
from tokenizers import Tokenizer

from edgegpt.checkpoint import load_checkpoint
from edgegpt.errors import EdgeGPTError
from edgegpt.export.onnx_export import GraphInfo, describe_graph, export_plain_onnx, graph_contract
from edgegpt.export.quantize import quantize_int8
from edgegpt.export.verify import Verification, check_float32, torch_reference, verify_onnx
from edgegpt.export.writer import MANIFEST, MODEL, generation_config, write_package_files
from edgegpt.io import staged_directory
from edgegpt.model import GPT

# Greedy-agreement prompts: short and generic, so any English-ish tokenizer encodes them.
VERIFY_PROMPTS = ("The ", "Once upon a time", "\n")


@dataclass
class ExportReport:
    checkpoint: Path
    package: Path
    precision: str  # "float32" or "int8"
    float32_bytes: int
    quantized_bytes: int | None
    quantization: dict[str, Any] | None
    verification: dict[str, Verification]  # by precision: always "float32", "int8" when quantized
    graph: GraphInfo  # of the package's model.onnx
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def size_ratio(self) -> float | None:
        return None if self.quantized_bytes is None else self.quantized_bytes / self.float32_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "package": str(self.package),
            "precision": self.precision,
            "sizes": {
                "float32_bytes": self.float32_bytes,
                "quantized_bytes": self.quantized_bytes,
                "ratio": self.size_ratio,
            },
            "quantization": self.quantization,
            "verification": {name: v.to_dict() for name, v in self.verification.items()},
            "opset": self.graph.opset,
            "ir_version": self.graph.ir_version,
            "operators": {"count": self.graph.op_count, "census": self.graph.census},
            "seconds": round(self.seconds, 2),
        }


def build_graph(model: GPT, path: Path) -> None:
    """The float32 graph of the package. The plain export today; a fused graph slots in here."""
    export_plain_onnx(model, path)


def check_destination(checkpoint: Path, out: Path) -> None:
    """Refuse to replace anything that is not an edgegpt package: the swap deletes what was there."""
    out, checkpoint = Path(out).resolve(), Path(checkpoint).resolve()
    if out == checkpoint or out in checkpoint.parents:
        raise EdgeGPTError(f"export destination {out} would overwrite the checkpoint; choose another output directory")
    if out.exists() and not out.is_dir():
        raise EdgeGPTError(f"export destination {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise EdgeGPTError(
            f"export destination {out} exists and is not an edgegpt model package; choose an empty or new directory"
        )


def encode_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [ids for text in VERIFY_PROMPTS if (ids := tokenizer.encode(text).ids)]


def export_package(
    checkpoint: Path,
    out: Path,
    *,
    quantize: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export the checkpoint at `checkpoint` as a model package at `out` (replaced atomically)."""
    say = progress or (lambda message: None)
    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    model, tokenizer = load_checkpoint(checkpoint)
    check_destination(checkpoint, out)
    say(f"exporting {checkpoint} to {out}")  # only once the inputs are known good: errors stay one line
    generation_config(tokenizer)  # fail before the slow steps if the tokenizer has no end-of-text token
    prompts = encode_prompts(tokenizer)

    with staged_directory(out) as stage:
        work = stage / "work"
        work.mkdir()
        float32_path = work / "model.float32.onnx"
        say("exporting the float32 graph with torch.onnx")
        build_graph(model, float32_path)
        say("verifying the float32 graph against PyTorch")
        reference = torch_reference(model, prompts)
        verification = {"float32": verify_onnx(reference, float32_path)}
        check_float32(verification["float32"])
        final, quantization, quantized_bytes = float32_path, None, None
        if quantize:
            say("quantizing weights to int8")
            final = work / "model.int8.onnx"
            quantization = quantize_int8(float32_path, final)
            quantized_bytes = final.stat().st_size
            say("verifying the int8 graph against PyTorch")
            verification["int8"] = verify_onnx(reference, final)
        float32_bytes = float32_path.stat().st_size
        os.replace(final, stage / MODEL)
        shutil.rmtree(work)

        say("writing the package")
        graph = describe_graph(stage / MODEL)
        precision = "int8" if quantize else "float32"
        manifest = write_package_files(
            stage,
            cfg=model.cfg,
            tokenizer=tokenizer,
            graph=graph_contract(model.cfg),
            manifest_fields={
                "opset": graph.opset,
                "ir_version": graph.ir_version,
                "precision": precision,
                "quantization": quantization,
                "operator_census": graph.census,
                "verification": {name: v.to_dict() for name, v in verification.items()},
            },
        )
    return ExportReport(
        checkpoint=checkpoint,
        package=out,
        precision=precision,
        float32_bytes=float32_bytes,
        quantized_bytes=quantized_bytes,
        quantization=quantization,
        verification=verification,
        graph=graph,
        seconds=time.perf_counter() - start,
        manifest=manifest,
    )


def render_report(report: ExportReport) -> Table:
    """The export's figures as a two-column table for the CLI."""
    table = Table(title=f"model package {report.package}", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_row("float32 size", f"{report.float32_bytes / 1e6:.2f} MB")
    if report.quantized_bytes is not None:
        table.add_row("int8 size", f"{report.quantized_bytes / 1e6:.2f} MB ({report.size_ratio:.2f}× float32)")
    for name, v in report.verification.items():
        table.add_row(f"max |Δlogits| {name} vs PyTorch", f"{v.max_diff:.2e}")
    for name, v in report.verification.items():
        agreed = f"{sum(v.greedy_matches)}/{sum(v.greedy_compared)} tokens"
        table.add_row(f"greedy agreement {name}", f"{v.greedy_agreement:.1%} ({agreed})")
    table.add_row("operators", f"{report.graph.op_count} nodes, {len(report.graph.census)} types")
    table.add_row("opset / IR version", f"{report.graph.opset} / {report.graph.ir_version}")
    return table
