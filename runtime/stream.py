"""The Stream that Generator.stream() / stream_tokens() / stream_chat() and the continuous batcher return:
an iterator of text pieces (or token ids) that also says, once it has ended, why (finish_reason) and how
many tokens it read and wrote (the OpenAI API's `usage`).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from edgegpt.runtime.decoding import Decoding
    from edgegpt.runtime.speculative import SpeculationStats

__all__ = ["Stream"]

T = TypeVar("T")


class Stream(Generic[T]):
    """What stream() and stream_tokens() return: an iterator of text pieces (or token ids) that also says
    why it ended and how many tokens it read and wrote, so `generate` and every existing loop over a stream
    keep working unchanged.

        stream = g.stream(prompt); text = "".join(stream); stream.finish_reason
        stream.prompt_tokens, stream.completion_tokens   # what the OpenAI API calls `usage`

    finish_reason, None until the iteration ends (and after an exception):
        "eos"         the model produced the end-of-text token (not included; stop_at_eos=True)
        "stop"        a stop string ended the text (stream() only)
        "length"      max_new_tokens tokens were generated
        "max_length"  the context is full: prompt + generated tokens reached max_length
        "cancelled"   `cancel` was set, or close() was called before the end
    """

    def __init__(self, source: typing.Generator[T, None, str], prompt_tokens: int = 0,
                 decoding: Decoding | None = None, speculation: SpeculationStats | None = None) -> None:
        self._source = source
        self._decoding = decoding
        self.prompt_tokens = prompt_tokens  # tokens of the prompt as the model reads it (after truncation)
        # With a draft or lookup: guesses proposed and kept, target passes (runtime/speculative.py); else None.
        self.speculation = speculation
        self.finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (an end-of-text token that ended it is not counted; the tokens of a stop
        string are: the model generated them)."""
        return 0 if self._decoding is None else len(self._decoding.tokens)

    def __iter__(self) -> "Stream[T]":
        return self

    def __next__(self) -> T:
        try:
            return next(self._source)
        except StopIteration as end:
            if self.finish_reason is None:  # an exhausted generator stops again with no value
                self.finish_reason = end.value
            raise StopIteration from None

    def close(self) -> None:
        """End the generation now, releasing its cache (as setting `cancel` does)."""
        self._source.close()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
