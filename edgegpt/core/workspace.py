"""The default workspace, so `train`, `export` and `generate` chain with no paths given."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("EDGEGPT_HOME") or "edgegpt-out")


def checkpoint_dir() -> Path:
    return home() / "checkpoint"


def model_dir() -> Path:
    return home() / "model"


def cache_dir() -> Path:
    return home() / "cache"
