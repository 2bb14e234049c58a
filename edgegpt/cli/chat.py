"""`edgegpt chat`: an interactive streaming loop over a running transcript.

    transcript = ""                                   each turn:
    line ─► transcript += line + "\\n" ─► fit to the context ─► stream the continuation to stdout
                                      ◄── transcript += reply + "\\n" ◄──┘

A base language model has no chat template, so the transcript is plain text, one turn per line; the
reply ends at the first blank line ("\\n\\n", the default stop string), at max_new_tokens or at the end of
text. options["stop"] replaces that default (a caller may want replies with blank lines in them);
`edgegpt chat --stop` adds to it instead: a reply that runs past a blank line goes on to invent the next
turns. When the transcript no longer fits, its oldest tokens are dropped so the prompt plus
max_new_tokens fit max_length (options["truncate"] None instead: a conversation that no longer fits is
an error). Commands: /reset forgets the transcript, /quit (or EOF, Ctrl-D) leaves.
Ctrl-C during a reply stops that reply; Ctrl-C at the prompt leaves.

Imports the runtime only (no torch), so the chat starts as fast as `edgegpt generate`.
"""

from __future__ import annotations

from typing import Callable, TextIO

from edgegpt.runtime import Generator
from edgegpt.runtime.options import resolve_options

DEFAULT_STOP = ("\n\n",)
HELP = "chat with the model: type a line and press Enter; /reset forgets the conversation, /quit leaves"


def fit_context(generator: Generator, transcript: str, max_new_tokens: int) -> str:
    """The transcript, its oldest tokens dropped so it leaves max_new_tokens of the context free
    (at least one token of it is always kept)."""
    tokenizer = generator.package.tokenizer
    ids = tokenizer.encode(transcript).ids
    budget = max(1, generator.max_length - max_new_tokens)
    return transcript if len(ids) <= budget else tokenizer.decode(ids[-budget:])


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
    options = {"stop": DEFAULT_STOP, **{k: v for k, v in options.items() if v is not None}}
    resolve_options(generator.package.generation, options)  # a bad option fails now, not after a line
    max_new_tokens = options.get("max_new_tokens") or generator.package.generation.max_new_tokens
    transcript = ""
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
            transcript = ""
            say("(conversation forgotten)\n")
            continue
        transcript += line + "\n"
        if fit:
            transcript = fit_context(generator, transcript, max_new_tokens)
        reply = ""
        stream = generator.stream(transcript, **options)
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
        transcript += reply + "\n"
