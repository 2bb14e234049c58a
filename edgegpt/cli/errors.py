"""How the CLI fails: a user mistake or a missing optional dependency is one line on stderr,
`edgegpt: error: ...`, and exit code 2; a bug keeps its traceback.

Stdlib and typer only: every command goes through here, `edgegpt generate` included.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, NoReturn

import typer
from typer.core import TyperGroup

from edgegpt.core.errors import EdgeGPTError

try:  # typer >= 0.20 vendors click and raises its own copy of click's exceptions
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer, on click itself
    from click.exceptions import UsageError

# The base install (runtime and CLI) lacks these; each comes with the extra named (pyproject.toml).
# onnxruntime, numpy and tokenizers are not here: the base install has them, so their absence is a broken
# environment, which keeps its traceback.
EXTRA_OF_MODULE = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "safetensors": "train",
    "transformers": "distill",
    "starlette": "serve",
    "uvicorn": "serve",
}


def missing_extra_message(error: ModuleNotFoundError, command: str, purpose: str = "",
                          extra: str | None = None) -> str | None:
    """The one line for `command` failing on an optional dependency that is not installed, or None when
    `error` is anything else. Only the top-level module itself counts as missing: a submodule that
    fails to import (`torch._C`) is a broken installation, which a traceback explains better. `extra`
    names the extra that brings everything this use of `command` needs, where that is not the module's own
    (converting a GGUF file needs [convert], which brings [train] along)."""
    if error.name not in EXTRA_OF_MODULE:
        return None
    extra = extra or EXTRA_OF_MODULE[error.name]
    needs = f"edgegpt {command}{f' {purpose}' if purpose else ''} needs {error.name}"
    return f"{needs}, which is not installed; it comes with the [{extra}] extra: pip install 'edgegpt[{extra}]'"


@contextmanager
def user_errors(command: str, purpose: str = "", needs: Iterable[str] = (), extra: str | None = None) -> Iterator[None]:
    """A user mistake (EdgeGPTError) or a missing optional dependency is one line on stderr and exit code 2;
    a bug keeps its traceback. `needs`: the optional modules `command` always imports, checked before it
    starts (export would otherwise find onnxscript missing only when it writes the package, minutes in).
    `purpose` says which use of `command` needs a module imported on the way (eval: "of a checkpoint")."""
    try:
        for module in needs:
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        yield
    except EdgeGPTError as e:
        fail(str(e))
    except ModuleNotFoundError as e:
        message = missing_extra_message(e, command, purpose, extra)
        if message is None:
            raise
        fail(message)


def fail(message: str) -> NoReturn:
    print(f"edgegpt: error: {message}", file=sys.stderr)
    raise typer.Exit(2) from None


class OneLineUsageErrors(TyperGroup):
    """click's usage errors (an option value of the wrong type, an unknown choice or command, a missing
    argument) as the project's one line, `edgegpt: error: ...`, exit code 2, instead of a usage block
    and a boxed message. Bare `edgegpt` still shows the help (click raises that as a usage error too)."""

    @staticmethod
    @contextmanager
    def _one_line() -> Iterator[None]:
        try:
            yield
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `edgegpt` with no arguments: the help, as before
                raise
            fail(" ".join(e.format_message().split()))

    def make_context(self, *args, **kwargs):  # the group's own options and arguments
        with self._one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):  # the command name, then the command's options and arguments
        with self._one_line():
            return super().invoke(ctx)
