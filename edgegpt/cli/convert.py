"""`edgegpt convert`: GGUF or Hugging Face models to a checkpoint, and a checkpoint to Hugging Face
(edgegpt/convert, which needs the training stack)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgegpt.cli.errors import user_errors
from edgegpt.cli.train import TRAINING_NEEDS


def convert(
    source: Path = typer.Argument(
        ..., help="A .gguf file (Llama, Qwen2, Qwen3, Gemma 3 or Gemma 2 architecture; F32, F16, BF16, Q4_0, Q4_1, "
        "Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS; byte-level BPE or SentencePiece tokenizer), a Hugging Face "
        "model directory (Llama, SmolLM, Llama 3.x, Mistral, Qwen2, Qwen3, Gemma 3, Gemma 2) or an edgegpt "
        "checkpoint."),
    out: Path = typer.Argument(..., help="Where to write the other format (a new directory)."),
) -> None:
    """Import a GGUF file or a Hugging Face model as a checkpoint, or write a checkpoint as a Hugging Face
    directory. Generation settings (eos ids, bos) and the chat template come along; a .gguf file needs the
    gguf package (pip install "edgegpt\\[convert]")."""
    from_gguf = source.suffix.lower() == ".gguf"
    with user_errors("convert", "of a .gguf file" if from_gguf else "", needs=TRAINING_NEEDS,
                     extra="convert" if from_gguf else None):
        from edgegpt.cli.console import StageProgress
        from edgegpt.convert import convert as run_convert

        # A bar on a terminal only: convert's stderr elsewhere stays empty, as scripts expect.
        with StageProgress(stage_lines=False) as shown:

            def tensors_read(done: int, total: int) -> None:
                shown.steps(done, total)
                if done == total:  # the checkpoint is written in one step after the last tensor
                    shown.stage("writing the checkpoint")

            shown.stage(f"converting {source.name}: tensors")
            direction, written = run_convert(source, out, progress=tensors_read)
    print(f"{direction}: {written}")
