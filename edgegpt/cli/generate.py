"""`edgegpt generate`: continue a prompt (or, with --chat, answer it), streaming the text to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from edgegpt.cli.errors import user_errors
from edgegpt.cli.options import (
    DraftOption,
    LookupOption,
    MaxLengthOption,
    MaxNewTokensOption,
    MinPOption,
    ModelOption,
    NoSpeculationOption,
    Provider,
    ProviderOption,
    RepetitionPenaltyOption,
    SeedOption,
    StopOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
    Truncate,
    TruncateOption,
    load_generator,
)
from edgegpt.core.errors import EdgeGPTError


def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text to continue (with --chat: the question); - reads it "
                                           "from standard input."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this UTF-8 "
                                               "file (any length: an argument is limited by the system)."),
    model: ModelOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    stop: StopOption = None,
    seed: SeedOption = None,
    provider: ProviderOption = Provider.auto,
    truncate: TruncateOption = Truncate.none,
    max_length: MaxLengthOption = None,
    chat: bool = typer.Option(False, "--chat", help="Ask PROMPT as one question (a user message) through the "
                              "package's chat template and print the answer alone."),
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
) -> None:
    """Continue PROMPT, streaming the text as it is generated (with --chat: answer it). A prompt given as an
    argument is printed before its continuation; one read from a file or standard input is not."""
    with user_errors("generate"):

        echo = prompt is not None and prompt != "-" and prompt_file is None
        prompt = read_prompt(prompt, prompt_file)

        generator, lookup = load_generator(model, provider, max_length, draft, lookup, no_speculation)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty, stop=stop or None, seed=seed,
                       truncate=truncate.option, lookup=lookup)
        if chat:
            pieces = generator.stream_chat([{"role": "user", "content": prompt}], **options)
        else:
            pieces = generator.stream(prompt, **options)
            if echo:
                sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if pieces.finish_reason == "max_length":
            sys.stdout.flush()
            print(f"edgegpt: the model's context ({generator.max_length} tokens) is full; "
                  "generation stopped before --max-new-tokens", file=sys.stderr)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from the argument, standard input (`-`) or --prompt-file: exactly one of them, UTF-8."""
    if (prompt is None) == (prompt_file is None):
        raise EdgeGPTError("give the prompt as an argument, as - (read from standard input) or with "
                           "--prompt-file PATH: exactly one of them")
    if prompt_file is not None:
        try:
            data, source = prompt_file.read_bytes(), str(prompt_file)
        except OSError as e:
            raise EdgeGPTError(f"cannot read --prompt-file {prompt_file} ({e.strerror or e})") from None
    elif prompt == "-":
        data, source = sys.stdin.buffer.read(), "standard input"
    else:
        return prompt
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeGPTError(f"the prompt from {source} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
