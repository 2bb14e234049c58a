"""The `edgegpt` command line: the Typer app, `edgegpt --version`, and `main`, the console script.

Each command lives in the module named after it (cli/train.py, cli/export.py, cli/eval.py, cli/generate.py,
cli/chat.py, cli/serve.py, cli/convert.py, cli/bench.py, cli/info.py); this module registers them in the
order `edgegpt --help` lists them. Options shared between commands are declared once in cli/options.py,
train's in TrainOptions (edgegpt/train/options.py).

Heavy modules (torch, onnx, the runtime) are imported inside the commands that need them, so `edgegpt
generate` starts as fast as the runtime does, and a base install (no torch) runs generate, chat, bench, info
and `eval PACKAGE`; the other commands then say in one line which extra to install (cli/errors.py).
"""

from __future__ import annotations

import sys

import typer

from edgegpt.cli.bench import bench
from edgegpt.cli.chat import chat
from edgegpt.cli.convert import convert
from edgegpt.cli.errors import OneLineUsageErrors
from edgegpt.cli.eval import evaluate
from edgegpt.cli.export import export, with_quantize_auto
from edgegpt.cli.generate import generate
from edgegpt.cli.info import info
from edgegpt.cli.serve import serve
from edgegpt.cli.train import train

app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train a compact GPT, export it as one ONNX package, and generate with it.",
)

app.command()(train)
app.command()(export)
app.command("eval")(evaluate)
app.command()(generate)
app.command()(chat)
app.command()(serve)
app.command()(convert)
app.command()(bench)
app.command()(info)


def installed_version() -> str:
    """The installed distribution's version; edgegpt.__version__ when it runs from a source tree that was
    never installed (a frozen app, or the checkout on sys.path). importlib.metadata is imported here, not
    at startup: every command would pay for it."""
    from importlib import metadata

    try:
        return metadata.version("edgegpt")
    except metadata.PackageNotFoundError:
        from edgegpt import __version__

        return __version__


def show_version(wanted: bool) -> None:
    if wanted:
        print(f"edgegpt {installed_version()}")
        raise typer.Exit(0)


@app.callback()
def options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                 help="Print edgegpt's version and exit."),
) -> None:
    # The docstring would replace the app's help: the options of `edgegpt` itself, before any command.
    pass


def main() -> None:
    app(args=with_quantize_auto(sys.argv[1:]), prog_name="edgegpt")
