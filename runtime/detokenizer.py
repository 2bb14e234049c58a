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
