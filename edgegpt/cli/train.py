"""`edgegpt train`: its training options are TrainOptions' fields (edgegpt/train/options.py), not a copy.

The command declares only its own options (what to read, where to write, how to report); `with_train_options`
gives it one more option per TrainOptions field made with option(), with that field's flag, type, default and
help, and the values come back as keyword arguments that go straight into TrainOptions. Torch is imported
when the command runs, so the base install still lists the options and answers with the one-line
"install the [train] extra" error.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer

from edgegpt.cli.errors import user_errors
from edgegpt.core import workspace
from edgegpt.train.options import Flag, TrainOptions, flag_name, flags, option_type

# The optional modules (cli/errors.py) that training imports, checked before it starts; convert needs them too.
TRAINING_NEEDS = ("torch", "safetensors")

# Where the command's own options stand among TrainOptions' in `edgegpt train --help`: each just before the
# training option named here, or (None) after them all.
LISTED_BEFORE = {"data": "from_checkpoint", "val_data": "from_checkpoint", "out": "max_steps", "resume": "save_every",
                 "cache_dir": None, "as_json": None}


def training_option(name: str, default: Any, flag: Flag) -> inspect.Parameter:
    """The command parameter for the TrainOptions field `name`: a path field takes a Path on the command line,
    and a bool is an on-only flag (`--compile`, no `--no-compile`), as the field's one flag name."""
    kind, optional = option_type(name)
    kind = Path if flag.path else kind
    annotation = Optional[kind] if optional else kind
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(flag_name(name), help=flag.help)])


def with_train_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` (whose `**training` receives the TrainOptions values) with a signature Typer reads: its own
    options placed as LISTED_BEFORE says among one option per TrainOptions flag, in the fields' order."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    params = []
    for field, flag in flags():
        params += [p for p in own if LISTED_BEFORE[p.name] == field.name]
        params.append(training_option(field.name, field.default, flag))
    params += [p for p in own if LISTED_BEFORE[p.name] is None]
    if len(params) != len(own) + len(flags()):  # LISTED_BEFORE names a field that is no training option
        raise TypeError(f"{command.__name__}: LISTED_BEFORE places an option before an unknown training option")
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    return command


def train_options(values: dict[str, Any]) -> TrainOptions:
    """TrainOptions from the command's values: the paths as strings (absolute where the field says so)."""
    values = dict(values)
    for field, flag in flags():
        path = values.get(field.name)
        if flag.path and path is not None:
            values[field.name] = str(path.resolve() if flag.absolute else path)
    return TrainOptions(**values)


DataOption = Annotated[Optional[List[Path]], typer.Option(
    "--data", help="Text files, directories (*.txt, *.md, *.jsonl, recursively) or .jsonl files: {\"text\"} "
    "records are text; {\"messages\"} (chat) or {\"prompt\", \"completion\"} records are examples to fine-tune "
    "on (with --from); repeatable. Default: the documentation that ships inside Python (pydoc topics and "
    "standard-library docstrings), so training needs no download.")]
ValDataOption = Annotated[Optional[List[Path]], typer.Option(
    "--val-data", help="Validation data of --data's kind; default: the last 10% of --data's text, or a seeded "
    "tenth of its examples.")]
OutOption = Annotated[Optional[Path], typer.Option(
    help="Checkpoint directory. Default: $EDGEGPT_HOME/checkpoint (./edgegpt-out).")]
ResumeOption = Annotated[bool, typer.Option(
    "--resume", help="Continue the run saved in --out exactly where it stopped.")]
CacheDirOption = Annotated[Optional[Path], typer.Option(help="Tokenized-data cache. Default: $EDGEGPT_HOME/cache.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON summary line at the end.")]


@with_train_options
def train(*, data: DataOption = None, val_data: ValDataOption = None, out: OutOption = None,
          resume: ResumeOption = False, cache_dir: CacheDirOption = None, as_json: JsonOption = False,
          **training: Any) -> None:
    """Train a compact GPT on your text (or on Python's own documentation by default), optionally
    distilled from a larger teacher, or fine-tune a checkpoint (--from), every weight or LoRA adapters
    (--lora). Under `torchrun --nproc_per_node N -m edgegpt train` it trains data-parallel on N devices."""
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    with user_errors("train", needs=TRAINING_NEEDS):
        from edgegpt.cli.console import TrainProgress
        from edgegpt.train.loop import train as run_training

        summary = run_training(
            list(data or []), list(val_data or []), out or workspace.checkpoint_dir(), train_options(training),
            cache_dir=cache_dir or workspace.cache_dir(), resume=resume,
            reporter=TrainProgress() if main_process else None,
        )
    if not main_process:
        return
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        from edgegpt.cli.console import stderr

        stderr.print(
            f"{summary.stopped.replace('_', ' ')}: {summary.steps} steps, {summary.tokens:,} tokens, "
            f"{summary.tokens_per_s:,.0f} tokens/s; best validation {summary.val_loss:.4f} nats/token = "
            f"{summary.val_nats_per_char:.4f} nats/char; checkpoint in {summary.checkpoint}"
            + (f"; teacher top-k: {summary.teacher_rows_cached:,} rows from its cache, "
               f"{summary.teacher_rows_computed:,} computed" if summary.teacher_rows_cached is not None else "")
        )
    if summary.stopped == "interrupted":
        print("edgegpt: interrupted; the checkpoint is saved, continue with --resume", file=sys.stderr)
        raise typer.Exit(130)
