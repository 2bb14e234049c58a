"""Options that more than one command takes, each declared once as a `typing.Annotated` type, so the flag
name, its help and its type stay the same in `generate`, `chat` and `bench` (and any later command):

    @app.command()
    def serve(model: ModelOption = None, temperature: TemperatureOption = None,
              provider: ProviderOption = Provider.auto) -> None: ...

The parameter name gives the flag (`temperature` -> `--temperature`), so a command names its parameter as
the type does (`TemperatureOption` -> `temperature`). The default is the parameter's, so commands may
differ in it (`--truncate`: none for generate, left for chat).

The sampling options default to None: the model package's generation_config.json decides (the runtime
fills them in, see edgegpt/runtime/options.py). Stdlib and typer only: `edgegpt --help` imports this.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from edgegpt.core import workspace

if TYPE_CHECKING:
    from edgegpt.runtime import Generator


class Provider(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Truncate(str, Enum):
    """What to do with a prompt longer than the context."""

    none = "none"  # an error
    left = "left"  # keep its last tokens, leaving room for --max-new-tokens (at least one prompt token)

    @property
    def option(self) -> str | None:
        """The runtime's `truncate` option: None is its "an error"."""
        return None if self is Truncate.none else self.value


ModelOption = Annotated[Optional[Path], typer.Option(help="Model package. Default: $EDGEGPT_HOME/model.")]
ProviderOption = Annotated[
    Provider, typer.Option(help="auto picks CUDA when onnxruntime-gpu and a GPU are present.")]
TruncateOption = Annotated[Truncate, typer.Option(
    help="A prompt (in chat: the conversation) longer than the context: none = an error; left = drop its "
    "oldest tokens (with a chat template: its oldest turns), leaving room for --max-new-tokens.")]
MaxLengthOption = Annotated[Optional[int], typer.Option(
    help="Tokens one sequence may hold, prompt and reply together (default: the model's context). The "
    "cache grows with what it holds up to this, so it caps memory rather than reserving it.")]

# -- sampling: each None means the package's generation_config.json -------------------------------------

MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    help="Most new tokens (in chat: per reply). Default: the package's generation_config.json.")]
TemperatureOption = Annotated[Optional[float], typer.Option(help="0 = greedy.")]
TopKOption = Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens (0 = off).")]
TopPOption = Annotated[Optional[float], typer.Option(
    help="Sample from the smallest set with this much probability (1 = off).")]
MinPOption = Annotated[Optional[float], typer.Option(
    help="Drop tokens less likely than this fraction of the most likely one (0 = off).")]
RepetitionPenaltyOption = Annotated[Optional[float], typer.Option(
    help="> 1 discourages tokens already in the text (1 = off).")]
StopOption = Annotated[Optional[List[str]], typer.Option(
    help="End the text before this string; repeatable. In chat these add to the blank line that always "
    "ends a reply.")]
SeedOption = Annotated[Optional[int], typer.Option(help="Same seed, same text.")]

# -- speculative decoding (runtime/speculative.py) --------------------------------------------------------

DraftOption = Annotated[Optional[Path], typer.Option(
    help="A draft model package (a smaller model with the same tokenizer) that guesses tokens ahead for the "
    "model to check in one pass. Default: the package's own draft/ (`edgegpt export --draft`), if it has one.")]
LookupOption = Annotated[bool, typer.Option(
    "--lookup", help="Guess ahead from the text so far (prompt lookup): faster where the output repeats the "
    "input (rewrites, summaries, answers from a document, code edits); turns itself down where it does not.")]
NoSpeculationOption = Annotated[bool, typer.Option(
    "--no-speculation", help="Never guess ahead: no draft (not even the package's own) and no lookup.")]


def speculation(draft: Path | None, lookup: bool, no_speculation: bool) -> tuple[str | Path | None, bool]:
    """(Generator.load's `draft`, the `lookup` option) for the three flags: the given draft, else the model
    package's own ("auto"); neither draft nor lookup with --no-speculation."""
    if no_speculation:
        return None, False
    return (draft if draft is not None else "auto"), lookup


def load_generator(model: Path | None, provider: Provider, max_length: int | None, draft: Path | None,
                   lookup: bool, no_speculation: bool) -> tuple[Generator, bool]:
    """The Generator `generate` and `chat` run (the workspace's package unless --model), with the three
    speculation flags applied, and the `lookup` option their calls take."""
    from edgegpt.runtime import Generator

    draft, lookup = speculation(draft, lookup, no_speculation)
    generator = Generator.load(model or workspace.model_dir(), provider=provider.value, max_length=max_length,
                               draft=draft)
    return generator, lookup
