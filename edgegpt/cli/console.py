"""What the CLI draws: a rich progress bar for training, and stage bars for export and convert. Progress goes
to stderr so that stdout carries only results (the generated text, or one JSON line with --json)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from edgegpt.scoring import Score
from edgegpt.train.reporting import Reporter

stderr = Console(stderr=True, highlight=False)


class TrainProgress(Reporter):
    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.smoothed: float | None = None
        self.parts: dict[str, float] = {}
        self.val = "-"

    def start(self, total_steps: int | None, budget_s: float | None, info: dict[str, Any]) -> None:
        stderr.print(
            f"training {info['parameters'] / 1e6:.2f}M parameters on {info['device']}: "
            f"{info['train_tokens']:,} training tokens, {info['val_tokens']:,} validation tokens, "
            f"{info['tokens_per_step']:,} tokens per step"
            + (f", resuming at step {info['resumed_at']}" if info["resumed_at"] else "")
            + (f", {info['processes']} processes" if info.get("processes", 1) > 1 else "")
        )
        if info.get("teacher"):
            stderr.print(f"distilling from {info['teacher']}")
        limit = " and ".join(filter(None, [f"{total_steps} steps" if total_steps else "",
                                           f"{budget_s / 60:g} min" if budget_s else ""]))
        self.progress = Progress(
            TextColumn("step {task.fields[step]:>6}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(f"until {limit}", total=1.0, step=info["resumed_at"], loss="-",
                                           val="-", speed="-")

    def step(self, step: int, loss: float, tokens_per_s: float, progress: float,
             parts: dict[str, float] | None = None) -> None:
        # A smoothed loss is readable; the raw one jumps from batch to batch.
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        for name, value in (parts or {}).items():  # distilling: the label and teacher terms, each smoothed
            previous = self.parts.get(name)
            self.parts[name] = value if previous is None else 0.95 * previous + 0.05 * value
        shown = f"{self.smoothed:.3f}" + "".join(f" {k} {v:.3f}" for k, v in self.parts.items())
        if self.progress:
            self.progress.update(self.task, completed=min(progress, 1.0), step=step, loss=shown,
                                 speed=f"{tokens_per_s:,.0f}")

    def evaluated(self, step: int, result: Score, best: bool) -> None:
        self.val = f"{result.nats_per_token:.3f} ({result.nats_per_char:.3f}/char){' *' if best else ''}"
        if self.progress:
            self.progress.update(self.task, val=self.val)
        if not stderr.is_terminal:  # no live bar in a log file: one line per validation instead
            parts = "".join(f", {k} {v:.3f}" for k, v in self.parts.items())
            stderr.print(f"step {step}: loss {self.smoothed:.3f}{parts}, validation {self.val}")

    def log(self, message: str) -> None:
        stderr.print(message)

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


class StageProgress:
    """A long command's stages (export's graph build, calibration, quantization, gates; convert's tensors) on
    stderr, fed by the library's two callbacks: stage(message) as a stage starts, steps(done, total) as it
    advances.

    On a terminal each stage is a live row: a spinner, the message, a bar (moving to and fro until the stage
    reports counts, then filling) and the time the stage has taken; a finished stage's row stays above the
    next. Anywhere else (a pipe, a log file) nothing is drawn: each stage is one printed line when
    `stage_lines` is on (what export printed before there were bars), and the counts are dropped."""

    def __init__(self, console: Console | None = None, stage_lines: bool = True) -> None:
        self.console = console or stderr
        self.stage_lines = stage_lines
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> StageProgress:
        if self.console.is_terminal:
            self.progress = Progress(
                SpinnerColumn(finished_text="✓"),
                # A long message (export's paths) is cut short rather than squeezing every row's bar away.
                TextColumn("{task.description}", table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=10)),
                TextColumn("{task.fields[count]}"),
                TimeElapsedColumn(),
                console=self.console,
                expand=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.progress is not None:
            if exc_info[0] is None:
                self._finish_stage()
            self.progress.stop()
            self.progress = None

    def stage(self, message: str) -> None:
        if self.progress is None:
            if self.stage_lines:
                self.console.print(message)
            return
        self._finish_stage()
        self.task = self.progress.add_task(message, total=None, count="")

    def steps(self, done: int, total: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done, total=total, count=f"{done:,}/{total:,}")

    def _finish_stage(self) -> None:
        """Stop the current stage's clock and fill its bar: the next stage starting means it is done."""
        if self.progress is not None and self.task is not None:
            task = next(t for t in self.progress.tasks if t.id == self.task)
            total = task.total if task.total else 1
            self.progress.update(self.task, total=total, completed=total)
            self.progress.stop_task(self.task)
            self.task = None
