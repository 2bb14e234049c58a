"""What a training run tells whoever started it: the hooks the loop calls. Torch-free, so the CLI's progress
bar (edgegpt/cli/console.py) imports in the base install."""

from __future__ import annotations

from typing import Any

from edgegpt.scoring import Score


class Reporter:
    """What training tells the user; the CLI draws a progress bar, tests stay silent."""

    def start(self, total_steps: int | None, budget_s: float | None, info: dict[str, Any]) -> None: ...
    def step(self, step: int, loss: float, tokens_per_s: float, progress: float,
             parts: dict[str, float] | None = None) -> None: ...
    def evaluated(self, step: int, result: Score, best: bool) -> None: ...
    def log(self, message: str) -> None: ...
    def stop(self) -> None: ...
