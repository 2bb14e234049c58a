"""Choosing the next token from a logits vector: small pure numpy functions (after litgpt).

    logits [vocab] ─► / temperature ─► top_k_filter ─► top_p_filter ─► softmax ─► sample(rng) ─► id
                  └─ temperature == 0: argmax (greedy; top_k and top_p cannot change the result)

The order (temperature, then top-k, then top-p) is Hugging Face's, so a package's
generation_config.json means the same thing to both. All randomness comes from the
`numpy.random.Generator` passed in: the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from edgegpt.errors import EdgeGPTError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise EdgeGPTError for values outside their ranges (bools are not numbers here)."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature):
        raise EdgeGPTError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature < 0:
        raise EdgeGPTError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0:
        raise EdgeGPTError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1:
        raise EdgeGPTError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")


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


def next_token(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """The next token id from logits [vocab]. Parameters are assumed checked by `check_sampling`."""
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    logits = top_k_filter(logits, int(top_k))
    logits = top_p_filter(logits, float(top_p))
    return sample(softmax(logits), rng)
