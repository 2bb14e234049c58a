"""Speculative decoding: guess several tokens cheaply, check them with one forward pass of the model.

At batch 1 a decode step reads every weight to make one token; a forward of K+1 tokens reads them once
for all K+1 positions, so it costs far less than K+1 steps (docs/benchmarks.md). So:

    history (prompt + kept tokens) ─► a drafter proposes d1..dK after the last token
        draft model   a smaller model with the same tokenizer runs ahead K steps (its own KV cache)
        lookup        the tokens that followed the latest earlier occurrence of the history's last
                      n-gram (n = 3, 2, 1): free to make, right whenever the text repeats itself
    target.forward([last, d1..dK]) ─► logits L0..LK     (one pass, on the target's own cache)
    verify, left to right (the standard rule, Leviathan et al. 2023 / Chen et al. 2023):
        p = the target's processed distribution at i (the Sampler's: penalties, temperature, top-k/p, min-p)
        q = the draft's, made the same way from the same history (lookup: all its mass on d_i)
        accept d_i with probability min(1, p(d_i) / q(d_i)); else sample from max(0, p − q), normalised,
        and stop; all K accepted: one more token from L_K (the bonus)
    Decoding.accept(the new tokens) applies the stop rules (eos, stop strings, max_new_tokens, the
    context) exactly as one at a time; the target's cache is set back to Decoding.fed (the rejected
    positions are overwritten by the next pass) and the draft's to the part of its guesses that held.

The result is distributed exactly as plain sampling of the logits the passes compute (greedy: p is
one-hot, so a draft is kept only when it is the argmax). On float32 packages a pass of K+1 tokens gives
the one-token logits to float32 rounding, so greedy text is the plain text (tests/test_speculative.py). On int8
packages it does not: onnxruntime's MatMulNBits computes a multi-token pass differently, so greedy text
with speculation is another text, not the plain one (`benchmarks/pass_numerics.py` measures |Δ logit|
between a 1-token and a 4-token pass: docs/benchmarks.md).
Seeded runs repeat, but draw other random numbers than plain decoding,
so a seeded sampled text differs from the plain one while following the same distribution.

How many to guess (GuessLength): the k in 1..8 with the most tokens per cost, or none. Each guess is kept
with a running probability a (kept / checked guesses, older passes weighing less), so k guesses make
1 + a + ... + a^k tokens per pass; a pass of k + 1 tokens costs pass_cost(k) one-token passes and each
guess the drafter's own cost. When no k promises 5% more tokens per cost than plain decoding, the drafter
pauses for a number of passes that doubles each time (8 up to 256) and then tries one guess, with a
fresh a = 1/2. So a draft that disagrees with the target, or lookup on text that never repeats, soon costs no
more than a verification of a guess or two now and then. Lookup keeps one such account per n-gram
length: a repeated 3-gram is mostly a copy in progress, a repeated token mostly chance. All of it is a
function of what was kept, never of measured time, so a seeded run draws the same numbers and makes the
same text every time.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.decoding import Decoding
from edgegpt.runtime.sampling import Sampler, sample

MOST_GUESSES = 8


@dataclass
class SpeculationStats:
    """What speculation did in one generation (Stream.speculation)."""

    proposed: int = 0  # drafted tokens checked by the target
    accepted: int = 0  # of which kept
    target_steps: int = 0  # forward passes of the target after the prompt
    tokens: int = 0  # tokens those passes produced

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.target_steps if self.target_steps else 0.0


class Drafter(Protocol):
    def propose(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to k tokens to follow `history` (its last token is not in the target's cache yet) and
        their distributions q (None: each guess is certain, all of q's mass on it)."""

    def settle(self, valid: int, proposed: int, accepted: int) -> None:
        """After a verification: history[:valid] still holds; `accepted` of `proposed` guesses were kept."""


# What a pass of k + 1 tokens costs in one-token passes, fitted to SmolLM2-135M int8 on a CPU; the first
# extra token costs most. Timed inside speculative runs (`benchmarks/speculative_costs.py`) passes cost
# somewhat more than this, so the model errs towards guessing (the figures: docs/benchmarks.md).
def pass_cost(k: int) -> float:
    return 1.0 if k == 0 else 1.1 + 0.13 * k


# What one guess costs in one-token target passes, verification included: a `nano` draft's step is a small
# fraction of a `small` target's, a little more for its catch-up step after an all-kept pass
# (`benchmarks/speculative_costs.py`, docs/benchmarks.md); a lookup is a dictionary probe, and checking a
# sampled guess a softmax.
DRAFT_GUESS_COST = 0.15
LOOKUP_GUESS_COST = 0.04
# Guessing must promise this much more than plain decoding: the cost model is a few percent off either way.
LEAST_GAIN = 1.05
FIRST_PAUSE, LONGEST_PAUSE = 8, 256
# How fast older passes stop counting in the kept rate, and the fresh start's weight (a = 1/2 over 2 guesses).
KEPT_DECAY = 0.9
PRIOR_KEPT, PRIOR_CHECKED = 1.0, 2.0


class GuessLength:
    """How many guesses to make next, from how many were kept (module doc)."""

    def __init__(self, guess_cost: float) -> None:
        self.guess_cost = guess_cost
        self.kept, self.checked = PRIOR_KEPT, PRIOR_CHECKED
        self.paused, self.pause = 0, FIRST_PAUSE // 2  # doubled when the first pause starts
        self.passes = 0  # passes with guesses since the last pause

    @property
    def rate(self) -> float:
        """The running probability that a guess is kept, given the guesses before it were."""
        return self.kept / self.checked

    def best(self) -> int:
        """The k with the most expected tokens per cost; 0 when none promises LEAST_GAIN over plain decoding."""
        a = self.rate

        def tokens_per_cost(k: int) -> float:
            return sum(a**i for i in range(k + 1)) / (pass_cost(k) + k * self.guess_cost)

        k = max(range(1, MOST_GUESSES + 1), key=tokens_per_cost)
        return k if tokens_per_cost(k) >= LEAST_GAIN else 0

    def next(self) -> int:
        """Guesses to make before the next pass (0 while paused)."""
        if self.paused:
            self.paused -= 1
            if self.paused:
                return 0
            self.kept, self.checked = PRIOR_KEPT, PRIOR_CHECKED  # try again afresh,
            return 1  # with the cheapest test: one guess
        k = self.best()
        if k == 0:
            # A short pause if guessing had paid for a while, else twice the last one.
            self.pause = FIRST_PAUSE if self.passes >= 2 * FIRST_PAUSE else min(2 * self.pause, LONGEST_PAUSE)
            self.paused, self.passes = self.pause, 0
        return k

    def update(self, proposed: int, accepted: int) -> None:
        """After a pass that checked `proposed` guesses and kept the first `accepted`."""
        if proposed:
            self.passes += 1
            self.kept = KEPT_DECAY * self.kept + accepted
            self.checked = KEPT_DECAY * self.checked + accepted + (accepted < proposed)


class LookupDrafter:
    """Prompt lookup: guesses are the tokens after the latest earlier occurrence of the last n-gram.

    How often they hold depends on the n-gram's length (a repeated 3-gram is mostly a copy in progress, a
    repeated token mostly chance), so each length keeps its own GuessLength."""

    def __init__(self, longest: int = 3) -> None:
        self.longest = longest
        self.lengths = {n: GuessLength(LOOKUP_GUESS_COST) for n in range(1, longest + 1)}
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where the tokens after its latest copy start
        self._indexed = 0  # history positions indexed so far
        self._matched = 0  # the n-gram length of the last guesses

    def propose(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], None]:
        # Index every n-gram that has a token after it (so the current last n-gram finds an earlier copy).
        for end in range(self._indexed, len(history) - 1):
            for n in range(1, self.longest + 1):
                if end + 1 >= n:
                    self._after[tuple(history[end + 1 - n : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(history) - 1)
        for n in range(min(self.longest, len(history)), 0, -1):
            start = self._after.get(tuple(history[-n:]))
            if start is not None:
                k = min(k, self.lengths[n].next())  # the longest match decides; a shorter one is weaker
                self._matched = n
                return (history[start : start + k], None) if k > 0 else ([], None)
        return [], None

    def settle(self, valid: int, proposed: int, accepted: int) -> None:
        if self._matched:
            self.lengths[self._matched].update(proposed, accepted)


class ModelDrafter:
    """A draft model (a smaller Generator with the same tokenizer) running ahead on its own cache."""

    def __init__(self, draft, seed: int | None) -> None:
        self.draft = draft
        self.length = GuessLength(DRAFT_GUESS_COST)
        self.rng = np.random.default_rng(None if seed is None else [seed, 1])  # its own stream of draws
        self.cache = None

    def propose(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray]]:
        # Positions: the history, then k - 1 guesses fed back (the last guess is never fed).
        k = min(k, self.draft.max_length - len(history) + 1, self.length.next())
        if k < 1:
            return [], []
        if self.cache is None:
            self.cache = self.draft.empty_cache()
        logits, self.cache = self.draft.forward(history[self.cache.length :], self.cache)
        window = self.cache.window
        if window is not None:  # guesses fed no further than the draft's next eviction: settle rolls back exactly
            k = min(k, window.next_eviction(self.cache.length) - self.cache.length)
        fork = sampler.fork(self.rng)
        guesses, distributions = [], []
        for i in range(k):
            q = fork.probabilities(logits[-1])
            guess = int(np.argmax(q)) if fork.greedy else sample(q, self.rng)
            fork.record(guess)
            guesses.append(guess)
            distributions.append(q)
            if i < k - 1:
                logits, self.cache = self.draft.forward([guess], self.cache)
        return guesses, distributions

    def settle(self, valid: int, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)
        if self.cache is not None and self.cache.length > valid:
            try:
                self.cache = self.cache.truncated(valid)
            except EdgeGPTError:  # a sliding window evicted what `valid` needs: prefill the history again
                self.cache = None


class Drafters:
    """Several drafters in order: the first that has guesses proposes (lookup is free, so it goes first)."""

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        self.drafters = list(drafters)
        self._last: Drafter | None = None

    def propose(self, history: list[int], k: int, sampler: Sampler):
        self._last = None
        for drafter in self.drafters:
            guesses, distributions = drafter.propose(history, k, sampler)
            if guesses:
                self._last = drafter
                return guesses, distributions
        return [], None

    def settle(self, valid: int, proposed: int, accepted: int) -> None:
        for drafter in self.drafters:
            mine = drafter is self._last
            drafter.settle(valid, proposed if mine else 0, accepted if mine else 0)


def verify(guesses: list[int], distributions: list[np.ndarray] | None, logits: np.ndarray,
           sampler: Sampler) -> tuple[list[int], int]:
    """The tokens one verification makes from the target's logits [len(guesses) + 1, vocab]: the kept
    guesses, then a corrected or bonus token; and how many guesses were kept (module doc)."""
    tokens = []
    for i, guess in enumerate(guesses):
        p = sampler.probabilities(logits[i])
        if sampler.greedy:
            keep = p[guess] == 1.0
        else:
            q_guess = 1.0 if distributions is None else distributions[i][guess]
            keep = sampler.rng.random() * q_guess < p[guess]  # probability min(1, p / q)
        if keep:
            sampler.record(guess)
            tokens.append(guess)
            continue
        if sampler.greedy:
            token = int(np.argmax(p))
        else:  # from max(0, p - q), normalised; q all on the guess (lookup): p without the guess
            residual = np.maximum(p - distributions[i], 0.0) if distributions is not None else p.copy()
            if distributions is None:
                residual[guess] = 0.0
            token = sample(residual / residual.sum(), sampler.rng) if residual.sum() > 0 else sample(p, sampler.rng)
        sampler.record(token)
        return [*tokens, token], len(tokens)
    return [*tokens, sampler.choose(logits[len(guesses)])], len(tokens)


def run_speculative(
    decoding: Decoding,
    prompt_ids: list[int],
    forward: Callable[[list[int]], np.ndarray],
    truncate: Callable[[int], None],
    sampler: Sampler,
    drafter: Drafter,
    max_length: int,
    stats: SpeculationStats,
    room: Callable[[], int | None] = lambda: None,
) -> typing.Generator[int, None, str]:
    """Decoding.run with guesses: forward(tokens) runs tokens after the target's cache and gives their
    logits [len, vocab]; truncate(n) sets the cache back to its first n tokens; room() is the most guesses the
    next pass may carry for that to stay possible (KVCache.speculative_room; None: no limit). Yields each kept
    token; returns the finish reason. Cancel is checked before every forward pass."""
    if decoding.done or decoding.cancelled():
        return decoding.finish_reason
    token = sampler.choose(forward(list(prompt_ids))[-1])
    history = [*prompt_ids, token]
    if decoding.accept([token]):
        yield token
    while not (decoding.done or decoding.cancelled()):
        # Room: the pass runs len(history) + k positions; guesses beyond max_new_tokens are wasted.
        limit = room()
        room_left = min(max_length - len(history), decoding.max_new_tokens - len(decoding.tokens) - 1,
                        *(() if limit is None else (limit,)))
        guesses, distributions = drafter.propose(history, room_left, sampler) if room_left > 0 else ([], None)
        guesses = guesses[: max(room_left, 0)]
        logits = forward([history[-1], *guesses])
        tokens, accepted = verify(guesses, distributions, logits, sampler)
        stats.target_steps += 1
        stats.proposed += len(guesses)
        stats.accepted += accepted
        stats.tokens += len(tokens)
        kept = decoding.accept(tokens)
        valid = len(history) + accepted  # the guesses that held are true history for the draft's cache
        history += tokens[:kept]
        drafter.settle(min(valid, len(history)), len(guesses), accepted)
        truncate(decoding.fed)
        for token in tokens[:kept]:
            yield token
    return decoding.finish_reason
