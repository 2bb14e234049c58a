"""Helpers shared by the benchmark scripts: where the reference data is, what machine this is, how a
figure-per-row result is printed, and the one way a benchmark makes a model with random weights.

Nothing here imports edgegpt or torch at import time: cuda_decode.py imports this module before it has
made edgegpt importable from a checkout, and compare_runtimes.py's worker processes must stay light."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from edgegpt.model import GPT

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def machine() -> str:
    """e.g. 'AMD EPYC 9R14 (2 cores), Linux x86_64, torch 2.13.0' — every figure names its machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores), {platform.system()} {platform.machine()}"


def print_figures(title: str, figures: dict, as_json: bool) -> None:
    """One row per figure (thousands separated), and the same figures as one JSON line with --json."""
    from rich.console import Console
    from rich.table import Table

    report = Table(title=title)
    report.add_column("figure")
    report.add_column("value", justify="right")
    for key, value in figures.items():
        report.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(report)
    if as_json:
        print(json.dumps(figures))


# The text the random-weight tokenizer learns from: any text will do, the weights are random anyway.
BENCHMARK_TEXT = "edgegpt benchmark text " * 100


def random_model(preset: str, texts: Sequence[str] = (BENCHMARK_TEXT,),
                 vocab_size: int | None = 300) -> tuple[GPT, Tokenizer]:
    """(GPT, tokenizer): `preset`'s shape with random weights (torch seed 0) and a byte-level BPE tokenizer
    trained on `texts` (vocab_size None: the preset's vocabulary). Enough to measure size, speed and memory;
    its logits are nearly flat, so never judge quality or quantization on it."""
    import torch

    from edgegpt.core.config import preset as make_preset
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    torch.manual_seed(0)
    cfg = make_preset(preset)
    tokenizer = train_tokenizer(list(texts), vocab_size or cfg.vocab_size)
    return GPT(cfg).eval(), tokenizer


def random_checkpoint(preset: str, directory: Path, texts: Sequence[str] = (BENCHMARK_TEXT,),
                      vocab_size: int | None = 300) -> Path:
    """`random_model` saved as a checkpoint directory (what export and the converters read)."""
    from edgegpt.checkpoint import save_checkpoint

    model, tokenizer = random_model(preset, texts, vocab_size)
    save_checkpoint(directory, model, tokenizer)
    return directory
