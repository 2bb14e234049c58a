"""Streaming detokenization: turn token ids into text pieces as they arrive.

Byte-level BPE splits a multi-byte UTF-8 character (an emoji, a CJK character) across tokens, so decoding
token by token would print U+FFFD halves. `tokenizers` has no incremental decoder for this, hence this
small one, using the prefix-offset / read-offset technique of Hugging Face text-generation-inference:

    ids:   ... already emitted ... │ prefix window │ unread tail │
                                   ^prefix         ^read

    prefix_text = decode(ids[prefix:read])     (text emitted last time, re-decoded for context)
    new_text    = decode(ids[prefix:])
    new_text ends in U+FFFD  ─► hold: the tail is an incomplete character, wait for more tokens
    otherwise                ─► emit new_text[len(prefix_text):]; prefix = read; read = len(ids)

Each step decodes only the window since the previous emission, so the cost per token does not grow
with the length of the text, and ids before the window are dropped. Because a window always starts
on a character boundary, the pieces joined equal `tokenizer.decode(all ids)`, and a U+FFFD is emitted
only where the full decode has one too (invalid bytes, not a character still arriving).
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed ids one at a time with `push`; call `flush` once at the end for any held-back tail.

    Holds per-stream state: use one StreamDecoder per generation (they are cheap).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []  # only the window: ids[prefix:] of the whole stream
        self._read = 0  # offset into self._ids where the unread tail starts

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[: self._read])
        new_text = self._decode(self._ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        # Slide the window: what was unread becomes the prefix context of the next step.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD, as in the full decode)."""
        prefix_text = self._decode(self._ids[: self._read])
        new_text = self._decode(self._ids)
        self._ids.clear()
        self._read = 0
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids) if ids else ""


class StopStrings:
    """Text pieces in, text out that never contains a stop string: ends before the first one.

        pending (held back) ─► text = pending + piece ─► a stop string in text? ─► emit text before it; stopped
                                                       └─► else hold back the longest tail that could begin a
                                                           stop string ("\\n" of "\\n\\n"), emit the rest

    A stop string spanning several tokens (or pieces) is therefore caught, and a stream never shows text
    it would have to take back. Held-back text that turns out not to start a stop string is emitted with
    the next piece, or by `flush` at the end. No stop strings: text passes straight through.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self.pending + piece
        starts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if starts:
            self.stopped, self.pending = True, ""
            return text[: min(starts)]
        hold = max(partial_match(text, s) for s in self.stops)
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        tail, self.pending = self.pending, ""
        return tail


def partial_match(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop` (0 if none)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class TextStream:
    """Token ids in, final text pieces out: StreamDecoder (whole UTF-8 characters), then StopStrings.
    One per generation; `stopped` turns True when a stop string ended the text."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopStrings(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        return self._stops.push(self._decoder.push(token_id))

    def flush(self) -> str:
        """The held-back tail at the end of generation ("" after a stop string)."""
        text = self._stops.push(self._decoder.flush())
        return text + ("" if self.stopped else self._stops.flush())
