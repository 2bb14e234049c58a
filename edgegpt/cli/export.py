"""`edgegpt export`: a checkpoint to an ONNX model package, checked by the quality gates (edgegpt/export)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from edgegpt.cli.errors import user_errors
from edgegpt.core import workspace
from edgegpt.core.errors import EdgeGPTError
from edgegpt.scoring import DEFAULT_EVAL_TOKENS

# The optional modules (cli/errors.py) that export imports, checked before it starts.
EXPORT_NEEDS = ("torch", "onnx", "onnxscript", "safetensors")


def export(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint directory. Default: $EDGEGPT_HOME/checkpoint."),
    out: Optional[Path] = typer.Option(None, help="Package directory. Default: $EDGEGPT_HOME/model."),
    quantize: bool = typer.Option(
        False, "--quantize", help="Quantize the weights (--bits): smaller, and faster on CPUs. `--quantize auto` "
        "chooses 4 bits, 8 bits or float32 for each projection: the smallest package within --max-ppl-increase."),
    bits: str = typer.Option("8", help="With --quantize: 8 (int8, the default), 4 (int4, smallest) or auto."),
    max_ppl_increase: Optional[float] = typer.Option(
        None, "--max-ppl-increase", help="With --quantize auto: the perplexity budget on held-out text, in percent "
        "of float32's (default 1)."),
    rounding: Optional[str] = typer.Option(
        None, help="With --quantize (nbits): rtn (round to nearest), search (importance-weighted scale search, "
        "the 8-bit default) or gptq (error compensation, the 4-bit default); search and gptq read calibration text."),
    block_size: Optional[int] = typer.Option(None, help="With --quantize (nbits): 32 (default), 64 or 128 "
                                             "weights per scale."),
    symmetric: bool = typer.Option(False, "--symmetric", help="With --quantize (nbits): no zero points (slightly "
                                   "smaller, less exact)."),
    accuracy_level: int = typer.Option(4, help="With --quantize (nbits): 4 (int8 activations inside MatMulNBits, "
                                       "fastest on CPUs) or 1 (float32; much slower at 8 bits)."),
    calibration_data: Optional[Path] = typer.Option(
        None, "--calibration-data", help="Text for calibrating quantization (JSONL examples: as the model reads "
        "them, chats through its template). Default: the end of the checkpoint's training data, else of the "
        "embedded Python documentation."),
    method: Optional[str] = typer.Option(None, help="With --quantize: nbits (MatMulNBits block-quantized weights, "
                                         "the default) or dynamic (int8 MatMulInteger, activations quantized at "
                                         "run time; 8 bits only)."),
    precision: str = typer.Option("fp32", help="fp32, or fp16 for CUDA packages (the CPU runtime refuses fp16)."),
    kv_cache: Optional[str] = typer.Option(
        None, "--kv-cache", help="KV-cache precision: fp32 (default), int8 (a quarter of the memory per token, "
        "CPU, fused graph; scales calibrated on the held-out text) or fp16 (only with --precision fp16, its "
        "default)."),
    no_fuse: bool = typer.Option(False, "--no-fuse", help="Keep the plain torch.onnx graph (portable reference) "
                                 "instead of the fused GroupQueryAttention graph."),
    no_gate: bool = typer.Option(False, "--no-gate", help="Write the package even if a quality gate fails "
                                 "(the manifest records it)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out text for the quality gates "
                                             "(or JSONL examples, as for --calibration-data). Default: the "
                                             "checkpoint's validation split."),
    eval_tokens: int = typer.Option(
        DEFAULT_EVAL_TOKENS, help="Score at most this many held-out tokens (keeps export fast)."),
    window: Optional[int] = typer.Option(None, help="The gates score in windows of this many tokens, stride half "
                                         "a window. Default: the model's context, at most 1024."),
    draft: Optional[Path] = typer.Option(
        None, "--draft", help="A smaller checkpoint with the same tokenizer (`edgegpt train --teacher CHECKPOINT`): "
        "exported with the same options into the package's draft/ folder, gated on its own, for speculative "
        "decoding; the report and manifest give how often it agrees with the model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON line."),
) -> None:
    """Export a checkpoint to an ONNX model package, checked against PyTorch by quality gates (with --draft,
    a draft model for speculative decoding beside it)."""

    def show(report) -> None:
        if as_json:
            print(json.dumps(report.to_dict()))
        else:
            from rich.console import Console

            from edgegpt.export import render_report

            Console().print(render_report(report))

    with user_errors("export", needs=EXPORT_NEEDS):
        from edgegpt.cli.console import StageProgress
        from edgegpt.export import GateFailed, export_package

        try:
            # --json: stderr stays silent. Otherwise a bar per stage on a terminal, one line per stage elsewhere.
            with nullcontext() if as_json else StageProgress() as shown:
                report = export_package(
                    checkpoint or workspace.checkpoint_dir(), out or workspace.model_dir(), fuse=not no_fuse,
                    precision=precision, quantize="auto" if bits == "auto" else quantize,
                    bits=parse_bits(bits), method=method, kv_cache=kv_cache, gate=not no_gate,
                    max_ppl_increase=max_ppl_increase, rounding=rounding, block_size=block_size,
                    symmetric=symmetric, accuracy_level=accuracy_level, calibration_data=calibration_data,
                    eval_data=eval_data, eval_tokens=eval_tokens, window=window, draft=draft,
                    progress=shown.stage if shown else None, steps=shown.steps if shown else None,
                )
        except GateFailed as failed:  # the table first (it says why), then the one-line error
            show(failed.report)
            raise
    show(report)


def parse_bits(bits: str) -> int:
    """--bits: 8, 4 or auto (auto is read with --quantize; alone it is an error export_package reports)."""
    if bits == "auto":
        return 8
    try:
        return int(bits)
    except ValueError:
        raise EdgeGPTError(f"--bits {bits} is not supported; choose 8, 4 or auto") from None


def with_quantize_auto(argv: list[str]) -> list[str]:
    """`export --quantize auto` is `--quantize --bits auto`: a flag cannot take an optional value in typer."""
    if not argv or argv[0] != "export":
        return argv
    out = []
    for i, arg in enumerate(argv):
        if arg == "auto" and i > 0 and argv[i - 1] == "--quantize":
            out += ["--bits", "auto"]
        elif arg == "--quantize=auto":
            out += ["--quantize", "--bits", "auto"]
        else:
            out.append(arg)
    return out
