"""Choosing the next token from a logits vector: small pure numpy functions (after litgpt).

    logits [vocab] ─► repetition_penalty(seen) ─► presence/frequency penalties(counts) ─┐
        ┌─────────────────────────────────────────────────────────────────────────────┘
        ├─ temperature == 0: argmax (greedy)
        └─ / temperature ─► top_k ─► top_p ─► min_p ─► softmax ─► sample(rng)

The order is Hugging Face's (the penalty is a logits processor, then the warpers temperature, top-k,
top-p, min-p), so a package's generation_config.json means the same thing to both. The penalty applies
before the greedy argmax too: it is meant to change which token wins. The presence and frequency penalties
are OpenAI's (what the server's clients send): logit − frequency × count − presence × (count > 0), counting
the tokens generated so far (not the prompt's), after the repetition penalty as llama.cpp applies them.
top-k/top-p/min-p cannot change an argmax, so greedy ignores them. All randomness comes from the
`numpy.random.Generator` a `Sampler` owns: the same seed gives the same tokens.

This module is the one sampler of edgegpt: the runtime and the PyTorch reference
(edgegpt/reference.py) both feed it numpy logits, so seeded they choose the same tokens.

Any logits get an answer (tests/test_properties.py), in the limit softmax itself tends to:
    NaN anywhere      EdgeGPTError "the model produced NaN logits": nothing sensible can be sampled
    +inf              the +inf tokens share all the probability (one of them is chosen; greedy: the first)
    all -inf          EdgeGPTError: every token has probability 0 (also when the repetition penalty
                      pushes every remaining logit past the float range)
    huge finite       computed in float64, shifted by the maximum before the temperature divides them,
                      so no temperature overflows the favourite (the distribution is shift-invariant)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Iterable

import numpy as np

from edgegpt.core.errors import EdgeGPTError


@dataclass(frozen=True)
class SamplingParams:
    """How to choose a token; the neutral value of each switches it off."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off; keep tokens with probability >= min_p × the top probability
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in prompt + output
    presence_penalty: float = 0.0  # 0 = off; in [-2, 2], subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # 0 = off; in [-2, 2], subtracted once per time a token was generated


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def check_sampling(
    temperature: float, top_k: int, top_p: float, min_p: float = 0.0, repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
) -> None:
    """Raise EdgeGPTError for values outside their ranges (bools are not numbers here)."""
    if not _number(temperature):
        raise EdgeGPTError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature < 0:
        raise EdgeGPTError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0:
        raise EdgeGPTError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise EdgeGPTError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if not _number(min_p) or not 0 <= min_p <= 1:
        raise EdgeGPTError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")
    if not _number(repetition_penalty) or repetition_penalty <= 0:
        raise EdgeGPTError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _number(value) or not -2 <= value <= 2:
            raise EdgeGPTError(f"{name} must be a number in [-2, 2] (0 = off), got {value!r}")


def repetition_penalty_filter(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty (Keskar et al. 2019, as Hugging Face applies it): for every id with seen[id] True,
    divide a positive logit by `penalty` and multiply a negative one, so penalty > 1 always makes it
    less likely. seen: bool [vocab]. penalty == 1.0: unchanged."""
    if penalty == 1.0 or not seen.any():
        return logits
    out = logits.copy()
    hit = out[seen]
    out[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    return out


def occurrence_penalty_filter(logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit − frequency × counts − presence × (counts > 0); counts: int [vocab], how often
    each id was generated so far. Both 0: unchanged."""
    if (presence == 0.0 and frequency == 0.0) or not counts.any():
        return logits
    return logits - frequency * counts - presence * (counts > 0)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits, set the rest to -inf. k == 0 or k >= vocab: unchanged.

    Exactly k survive even when logits tie (argpartition, not a threshold), so top_k=1 is greedy.
    """
    if k == 0 or k >= logits.shape[-1]:
        return logits
    keep = np.argpartition(-logits, k - 1)[:k]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    The most likely token always survives (the mass before it is 0 < p), so no p empties the set.
    p == 1.0: unchanged.
    """
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    mass_before = np.cumsum(probs) - probs
    out = np.full_like(logits, -np.inf)
    keep = order[mass_before < p]
    out[keep] = logits[keep]
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p × the largest one.
    In logits: logit >= max + log(min_p). The most likely token always survives. min_p == 0: unchanged."""
    if min_p <= 0.0:
        return logits
    threshold = np.max(logits) + math.log(min_p)
    return np.where(logits >= threshold, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (-inf logits get exactly 0)."""
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one index from `probs` by inverse CDF (one uniform per token; zero-probability ids never win)."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, len(probs) - 1)  # guards float round-off in the last bucket


def _limit(logits: np.ndarray) -> np.ndarray:
    """logits (float64) as the sampler can use them: +inf ones as the only candidates (softmax's limit),
    NaN or nothing but -inf refused (module doc)."""
    if np.isnan(logits).any():
        raise EdgeGPTError("the model produced NaN logits; no token can be sampled (the model is damaged)")
    top = logits.max()
    if top == np.inf:
        return np.where(logits == np.inf, 0.0, -np.inf)
    if top == -np.inf:
        raise EdgeGPTError("every logit is -inf, so every token has probability 0; no token can be sampled")
    return logits


def next_token(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seen: np.ndarray | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    counts: np.ndarray | None = None,
) -> int:
    """The next token id from logits [vocab]; seen: bool [vocab], ids the repetition penalty applies to;
    counts: int [vocab], how often each id was generated (the presence and frequency penalties).
    Parameters are assumed checked by `check_sampling`. Greedy draws no random number.
    Raises EdgeGPTError for NaN or all -inf logits (module doc)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    logits = penalized(logits, params, seen, counts)
    if temperature == 0:
        return int(np.argmax(logits))
    return sample(warped_probabilities(logits, params), rng)


def penalized(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None,
              counts: np.ndarray | None) -> np.ndarray:
    """logits (float64) after the logits processors: the repetition, presence and frequency penalties."""
    logits = _limit(np.asarray(logits, dtype=np.float64))
    if seen is not None:
        with np.errstate(over="ignore"):  # a huge logit may leave the float range: _limit handles it
            logits = _limit(repetition_penalty_filter(logits, seen, float(params.repetition_penalty)))
    if counts is not None:
        with np.errstate(over="ignore"):
            logits = _limit(occurrence_penalty_filter(logits, counts, params.presence_penalty,
                                                      params.frequency_penalty))
    return logits


def warped_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Probabilities (float64) from penalized logits through the warpers: temperature (> 0), top-k, top-p,
    min-p. What `sample` draws from."""
    with np.errstate(over="ignore"):  # only towards -inf: after the shift every logit is <= 0
        logits = (logits - logits.max()) / params.temperature
    logits = top_k_filter(logits, int(params.top_k))
    logits = top_p_filter(logits, float(params.top_p))
    logits = min_p_filter(logits, float(params.min_p))
    return softmax(logits)


class Sampler:
    """One sequence's token chooser: the params, its own random generator and the ids seen so far.

    Per sequence, never shared between threads or rows: `choose` advances the generator and records the
    chosen id for the penalties. The runtime and the PyTorch reference both use this class.

    Speculative decoding (runtime/speculative.py) needs the distribution itself: `probabilities(logits)`
    is exactly what `choose` samples from (greedy: all the mass on the argmax), `record(token)` what it
    remembers afterwards, and `fork(rng)` a copy of the remembered ids for a draft to run ahead with.
    """

    def __init__(self, params: SamplingParams, seed: int | None, prompt_ids: Iterable[int], vocab_size: int) -> None:
        self.params = params
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size  # ids the tokenizer can decode; logits beyond are dropped
        self.seen = np.zeros(vocab_size, bool)
        self.seen[[i for i in prompt_ids if 0 <= i < vocab_size]] = True
        self.counts = np.zeros(vocab_size, np.int64)  # generated ids only (the presence/frequency penalties)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def choose(self, logits: np.ndarray) -> int:
        """The next id from logits [>= vocab_size] (a model's vocab may be padded past the tokenizer's)."""
        logits = self._penalized(logits)
        token = int(np.argmax(logits)) if self.greedy else sample(warped_probabilities(logits, self.params), self.rng)
        self.record(token)
        return token

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `choose` would sample from now: float64 [vocab_size] (greedy: one-hot)."""
        logits = self._penalized(logits)
        if self.greedy:
            probs = np.zeros(self.vocab_size)
            probs[int(np.argmax(logits))] = 1.0
            return probs
        return warped_probabilities(logits, self.params)

    def record(self, token: int) -> None:
        """Remember a chosen (or accepted) token for the penalties."""
        self.seen[token] = True
        self.counts[token] += 1

    def fork(self, rng: np.random.Generator) -> "Sampler":
        """A copy that remembers the same ids and draws from `rng`: a draft's sampler."""
        twin = copy.copy(self)
        twin.rng, twin.seen, twin.counts = rng, self.seen.copy(), self.counts.copy()
        return twin

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        return penalized(logits[: self.vocab_size], p, self.seen if p.repetition_penalty != 1.0 else None,
                         self.counts if p.presence_penalty or p.frequency_penalty else None)
