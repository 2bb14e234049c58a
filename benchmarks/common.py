"""Helpers shared by the benchmark scripts: where the reference data is, and what machine this is."""

from __future__ import annotations

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
