"""Helpers shared by the benchmark scripts: where the reference data is, what machine this is, and
how a figure-per-row result is printed."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

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
