"""`edgegpt chat`: an interactive streaming loop, in one of two modes chosen by the package.

With a chat template (chat_template.jinja: an instruct model), the conversation is kept as messages:

    messages = []                                     each turn:
    line ─► messages += user(line) ─► drop the oldest turns to fit ─► Generator.stream_chat ─► stdout
                                  ◄── messages += assistant(reply) ◄──┘

The template writes the model's own turn markers and a reply ends at its end of turn (any eos id of
generation_config.json), so no stop string is added; blank lines inside a reply are kept. When the
conversation no longer fits, Generator.fit_chat drops its oldest turns (never the system messages nor
the last turn) so the prompt leaves max_new_tokens of max_length free.

Without one (a base model, trained on plain text), a running transcript:

    transcript = ""                                   each turn:
    line ─► transcript += line + "\\n" ─► fit to the context ─► stream the continuation to stdout
                                      ◄── transcript += reply + "\\n" ◄──┘

one turn per line; the reply ends at the first blank line ("\\n\\n", the default stop string), at
max_new_tokens or at the end of text. When the transcript no longer fits, its oldest tokens are dropped
so the prompt plus max_new_tokens fit max_length.

In both modes options["stop"] replaces the default stop strings (a caller may want replies with blank
lines in them); `edgegpt chat --stop` adds to them instead (default_stop): in a transcript a reply that
runs past a blank line goes on to invent the next turns. options["truncate"] None instead of "left": a
conversation that no longer fits is an error. Commands: /reset forgets the conversation, /quit (or EOF,
Ctrl-D) leaves. Ctrl-C during a reply stops that reply (what came of it stays in the conversation);
Ctrl-C at the prompt leaves.

The command imports the runtime when it runs (never torch), so `edgegpt --help` stays light and the chat
starts as fast as `edgegpt generate`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, TextIO

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

if TYPE_CHECKING:
    from edgegpt.runtime import Generator

DEFAULT_STOP = ("\n\n",)


def chat(
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
    truncate: TruncateOption = Truncate.left,
    max_length: MaxLengthOption = None,
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
) -> None:
    """Talk to a model: each line you type is a turn of the conversation and the reply streams back.
    With the package's chat template (an instruct model) the conversation is kept as messages and a
    reply ends at the model's end of turn; without one, as a plain transcript where a reply ends at a
    blank line (or at a --stop string). /reset forgets the conversation; /quit, Ctrl-D or Ctrl-C leaves."""
    with user_errors("chat"):
        generator, lookup = load_generator(model, provider, max_length, draft, lookup, no_speculation)
        # --stop adds to the transcript's blank line rather than replacing it: without that stop a reply
        # would run on into the next turns of the conversation.
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty,
                       stop=[*default_stop(generator), *stop] if stop else None, seed=seed, truncate=truncate.option,
                       lookup=lookup)
        chat_loop(generator, sys.stdin.readline, sys.stdout, lambda text: print(text, end="", file=sys.stderr,
                                                                                flush=True), options)
        print(file=sys.stderr)


HELP = "chat with the model: type a line and press Enter; /reset forgets the conversation, /quit leaves"


def default_stop(generator: Generator) -> tuple[str, ...]:
    """The stop strings a reply ends at unless the caller gives its own: a blank line in a transcript,
    none with a chat template (the model ends its turn itself)."""
    return () if generator.package.chat_template is not None else DEFAULT_STOP


def fit_context(generator: Generator, transcript: str, max_new_tokens: int) -> str:
    """The transcript, its oldest tokens dropped so it leaves max_new_tokens of the context free
    (at least one token of it is always kept)."""
    tokenizer = generator.package.tokenizer
    ids = tokenizer.encode(transcript).ids
    budget = max(1, generator.max_length - max_new_tokens)
    return transcript if len(ids) <= budget else tokenizer.decode(ids[-budget:])


class Transcript:
    """A base model's conversation: plain text, one turn per line."""

    def __init__(self, generator: Generator, fit: bool, max_new_tokens: int) -> None:
        self.generator, self.fit, self.max_new_tokens = generator, fit, max_new_tokens
        self.text = ""

    def reset(self) -> None:
        self.text = ""

    def ask(self, line: str, options: dict):
        self.text += line + "\n"
        if self.fit:
            self.text = fit_context(self.generator, self.text, self.max_new_tokens)
        return self.generator.stream(self.text, **options)

    def answered(self, reply: str) -> None:
        self.text += reply + "\n"


class Messages:
    """An instruct model's conversation: messages rendered by the package's chat template."""

    def __init__(self, generator: Generator, fit: bool, max_new_tokens: int) -> None:
        self.generator, self.fit, self.max_new_tokens = generator, fit, max_new_tokens
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        self.messages = []

    def ask(self, line: str, options: dict):
        self.messages.append({"role": "user", "content": line})
        if self.fit:
            # Kept as fitted, so a long session does not render its whole history again every turn.
            self.messages = self.generator.fit_chat(self.messages, self.max_new_tokens)
        return self.generator.stream_chat(self.messages, **options)

    def answered(self, reply: str) -> None:
        self.messages.append({"role": "assistant", "content": reply})


def chat_loop(
    generator: Generator,
    read_line: Callable[[], str],
    out: TextIO,
    say: Callable[[str], None],
    options: dict,
) -> None:
    """Run turns until /quit or end of input. read_line returns "" at EOF (like TextIO.readline);
    replies stream to `out`; `say` shows prompts and notices (stderr in the CLI)."""
    from edgegpt.runtime.options import resolve_options

    fit = options.get("truncate", "left") == "left"  # read before the Nones are dropped: None means "none"
    options = {"stop": default_stop(generator) or None, **{k: v for k, v in options.items() if v is not None}}
    resolve_options(generator.package.generation, options)  # a bad option fails now, not after a line
    max_new_tokens = options.get("max_new_tokens") or generator.package.generation.max_new_tokens
    kind = Messages if generator.package.chat_template is not None else Transcript
    conversation = kind(generator, fit, max_new_tokens)
    say(HELP + "\n")
    while True:
        say("> ")
        try:
            line = read_line()
        except KeyboardInterrupt:
            return
        if not line:  # end of input
            return
        line = line.rstrip("\n")
        if line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            conversation.reset()
            say("(conversation forgotten)\n")
            continue
        reply = ""
        stream = conversation.ask(line, options)
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
                reply += piece
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            stream.close()
        out.write("\n")
        out.flush()
        if stream.finish_reason == "max_length":
            say(f"(the context of {generator.max_length} tokens is full: the reply was cut short)\n")
        conversation.answered(reply)
