"""`edgegpt info`: what a checkpoint or a model package holds (drawn by cli/inspect.py, no torch needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgegpt.cli.errors import user_errors


def info(directory: Path = typer.Argument(..., help="A checkpoint or a model package directory.")) -> None:
    """Show what a checkpoint or a model package holds."""
    with user_errors("info"):
        from rich.console import Console

        from edgegpt.cli.inspect import describe

        Console().print(describe(directory))
