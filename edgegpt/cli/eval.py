"""`edgegpt eval`: the quality of a checkpoint (PyTorch) or of a package (the runtime, no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgegpt.cli.errors import user_errors
from edgegpt.scoring import DEFAULT_EVAL_TOKENS


def evaluate(
    model: Path = typer.Argument(..., help="A model package or a checkpoint directory."),
    data: Optional[Path] = typer.Option(None, help="Held-out text (file, directory or .jsonl). Default for a "
                                        "checkpoint: its validation split; a package needs --data."),
    reference: Optional[Path] = typer.Option(None, help="Compare with this checkpoint or package: top-1 and "
                                             "greedy agreement, Δ perplexity."),
    eval_tokens: int = typer.Option(DEFAULT_EVAL_TOKENS, help="Score at most this many tokens."),
    window: Optional[int] = typer.Option(None, help="Score in windows of this many tokens, stride half a window. "
                                         "Default: the model's context, at most 1024."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads for a package (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON line."),
) -> None:
    """Perplexity, nats per token and per character of a checkpoint (PyTorch) or a package (runtime)."""
    with user_errors("eval", "of a checkpoint"):  # a package is scored by the runtime, without torch
        from edgegpt.quality import run_eval

        rows, text = run_eval(model, data, reference, eval_tokens, threads, window)
    from edgegpt.quality import metrics_json, metrics_table

    if as_json:
        print(metrics_json(rows, text))
    else:
        from rich.console import Console

        Console().print(metrics_table(rows, text, title=f"quality of {model}"))
