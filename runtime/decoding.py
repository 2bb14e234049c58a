"""The one decode loop: what happens to tokens once they are chosen, for every way edgegpt generates.

    prompt ─► prefill() ─► logits ─► choose(logits) ─► Decoding.accept([token, ...]) ─► kept tokens
                             ▲                                   │ (the stop rules, in this order per token)
                             └──────── feed(token) ◄─ not done ──┘   eos        end, the token is not kept
                                                                     stop       a stop string ended the text
                                                                     length     max_new_tokens were kept
                                                                     max_length no position left to feed it
                                                     cancel ─► "cancelled", checked before every forward pass

`Decoding` owns those rules, the finish reason, the text (streaming detokenization with stop strings held
back) and cancellation. `accept` takes several tokens at once and says how many it kept, so a caller that
verified a run of drafted tokens keeps exactly as many as plain decoding would have and rolls its cache
back to `Decoding.fed` (KVCache.truncated). `Decoding.run` is the loop itself, for any model that offers a
prefill and a one-token feed: the runtime's Generator and batch rows, the PyTorch reference
(edgegpt/reference.py), the export gates' greedy checks and `edgegpt bench` all go through it.
"""

from __future__ import annotations

import typing
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from edgegpt.runtime.detokenizer import TextStream

# Why a generation ended (Stream.finish_reason).
FINISH_REASONS = ("eos", "stop", "length", "max_length", "cancelled")


class Cancel(Protocol):
    """What `cancel=` takes: a threading.Event, or anything with is_set()."""

    def is_set(self) -> bool: ...


class Decoding:
    """One sequence's life after its prompt: which chosen tokens are kept, the text, and why it ends.

    prompt_length: tokens already in the cache when the first new token is chosen.
    max_new_tokens: kept tokens at most. max_length: positions the cache has (prompt + fed tokens).
    eos_ids: tokens that end generation when stop_at_eos (never kept); empty: nothing does.
    text: a TextStream when the caller wants text (stop strings apply there); None for token ids only.
    cancel: checked by `cancelled()` before each forward pass.
    """

    def __init__(
        self,
        prompt_length: int,
        max_new_tokens: int,
        max_length: int,
        eos_ids: Iterable[int] = (),
        stop_at_eos: bool = True,
        text: TextStream | None = None,
        cancel: Cancel | None = None,
    ) -> None:
        self.prompt_length, self.max_new_tokens, self.max_length = prompt_length, max_new_tokens, max_length
        self.eos_ids = frozenset(eos_ids) if stop_at_eos else frozenset()
        self.text, self.cancel = text, cancel
        self.tokens: list[int] = []  # kept so far
        self.finish_reason: str | None = None
        self._pending: list[str] = []  # text not yet taken
        if max_new_tokens == 0:
            self._finish("length")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def fed(self) -> int:
        """Tokens the cache must hold to go on: the prompt and every kept token but the last, which is
        fed next (or never, once done)."""
        return self.prompt_length + max(len(self.tokens) - 1, 0)

    def accept(self, tokens: Sequence[int]) -> int:
        """Apply the stop rules to `tokens`, in order; return how many were kept (the first that ends
        the generation is kept unless it is an end-of-text token; none after it are)."""
        kept = 0
        for token in tokens:
            if self.done:
                break
            if token in self.eos_ids:
                self._finish("eos")
                break
            self.tokens.append(int(token))
            kept += 1
            if self.text is not None:
                self._pending.append(self.text.push(token))
                if self.text.stopped:
                    self._finish("stop")
                    break
            if len(self.tokens) == self.max_new_tokens:
                self._finish("length")
            # Feeding it would need one more position than the context has.
            elif self.prompt_length + len(self.tokens) - 1 >= self.max_length:
                self._finish("max_length")
        return kept

    def cancelled(self) -> bool:
        """True (and finished as "cancelled") when `cancel` is set; called before each forward pass."""
        if not self.done and self.cancel is not None and self.cancel.is_set():
            self._finish("cancelled")
        return self.finish_reason == "cancelled"

    def take_text(self) -> str:
        """The text that became final since the last call (never part of a stop string)."""
        piece = "".join(self._pending)
        self._pending.clear()
        return piece

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.text is not None:
            self._pending.append(self.text.flush())

    def run(
        self,
        prefill: Callable[[], np.ndarray],
        feed: Callable[[int], np.ndarray],
        choose: Callable[[np.ndarray], int],
    ) -> typing.Generator[int, None, str]:
        """The loop: prefill() gives the logits [vocab] after the prompt, choose picks a token, feed(token)
        runs it and gives the next logits. Yields each kept token; returns the finish reason. Closing the
        generator ends it at once (the caller's cache goes with it)."""
        if self.done or self.cancelled():
            return self.finish_reason
        logits = prefill()
        while True:
            token = choose(logits)
            if self.accept([token]):
                yield token
            if self.done or self.cancelled():
                return self.finish_reason
            logits = feed(token)


def argmax(logits: np.ndarray) -> int:
    """Greedy choice (the first of tied maxima, as the Sampler's greedy)."""
    return int(np.argmax(logits))


def greedy(prefill: Callable[[], np.ndarray], feed: Callable[[int], np.ndarray], prompt_length: int,
           n_tokens: int) -> list[int]:
    """The greedy continuation, exactly n_tokens long: end-of-text and the context do not stop it (the
    quality gates compare models token by token; the caller keeps prompt + n_tokens within the context)."""
    decoding = Decoding(prompt_length, n_tokens, max_length=prompt_length + n_tokens, stop_at_eos=False)
    return list(decoding.run(prefill, feed, argmax))
