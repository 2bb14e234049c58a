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

Imports the runtime only (no torch), so the chat starts as fast as `edgegpt generate`.
"""

from __future__ import annotations

from typing import Callable, TextIO

from edgegpt.runtime import Generator
from edgegpt.runtime.options import resolve_options

DEFAULT_STOP = ("\n\n",)
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
