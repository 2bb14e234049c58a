"""Check an exported float32 graph against the PyTorch model it came from: max |Δlogits|.

At past lengths 0, 1 and 37 (as far as the context allows): prefill `past` random tokens, then run
NEW_TOKENS more on top of the returned cache, and compare every logit of both calls with PyTorch's.
The graph runs through the runtime's Generator, so the check covers what an app runs, whichever
cache layout the graph has (the plain graph's concat cache or the fused graph's static buffer).

The float32 graph must match within FLOAT32_TOLERANCE (a quality gate, export/gates.py); the quality
of quantized and float16 graphs is judged on real text instead (edgegpt/quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT
from edgegpt.reference import torch_threads

PAST_LENGTHS = (0, 1, 37)
NEW_TOKENS = 8  # tokens run on top of each past
# float32 graph vs PyTorch, absolute, as the issue fixes it: reordered float32 sums differ by ~1e-6 per
# layer (measured 2e-6 to 1e-5 on nano, micro and small), so 1e-4 leaves room for deep models and still
# catches any real mistake (which shows up as differences of order 1).
FLOAT32_TOLERANCE = 1e-4


@dataclass
class Reference:
    """PyTorch's logits, computed once, compared with every graph an export produces."""

    # past length -> the calls made: (token ids, logits [S, vocab]); the first call starts from an
    # empty cache, the second (when the past is nonzero) continues from the first one's cache.
    calls: dict[int, list[tuple[list[int], np.ndarray]]]

    @property
    def logit_scale(self) -> float:
        return max(float(np.abs(logits).max()) for calls in self.calls.values() for _, logits in calls)


@torch.no_grad()
def torch_reference(model: GPT, past_lengths: Sequence[int] = PAST_LENGTHS, seed: int = 0) -> Reference:
    rng = np.random.default_rng(seed)
    calls: dict[int, list[tuple[list[int], np.ndarray]]] = {}
    with torch_threads(1):
        for past_len in past_lengths:
            if past_len + NEW_TOKENS > model.cfg.max_len:
                continue
            ids = rng.integers(0, model.cfg.vocab_size, past_len + NEW_TOKENS).tolist()
            chunks = [ids[:past_len], ids[past_len:]] if past_len else [ids]
            past, calls[past_len] = model.empty_cache(), []
            for chunk in chunks:
                logits, past = model.forward_cached(torch.tensor([chunk]), past)
                if not torch.isfinite(logits).all():
                    raise EdgeGPTError(
                        "the checkpoint produces NaN/inf logits; retrain it or export an earlier checkpoint"
                    )
                calls[past_len].append((chunk, logits[0].numpy()))
    return Reference(calls=calls)


@dataclass
class Verification:
    """One graph checked against PyTorch."""

    max_abs_logit_diff: dict[int, float]  # by past length
    logit_scale: float  # the largest |logit| PyTorch produced in those runs
    tolerance: float  # absolute bound on max |Δlogits| (FLOAT32_TOLERANCE)

    @property
    def max_diff(self) -> float:
        return max(self.max_abs_logit_diff.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "max_abs_logit_diff": {str(k): v for k, v in self.max_abs_logit_diff.items()},
            "logit_scale": self.logit_scale,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def verify_generator(reference: Reference, generator, tolerance: float = FLOAT32_TOLERANCE) -> Verification:
    """Compare a runtime Generator (over the graph to check) with PyTorch's answers."""
    diffs = {}
    for past_len, calls in reference.calls.items():
        cache, worst = generator.empty_cache(), 0.0
        for ids, expected in calls:
            got, cache = generator.forward(ids, cache)
            worst = max(worst, float(np.abs(np.asarray(got, np.float32) - expected).max()))
        diffs[past_len] = worst
    scale = reference.logit_scale
    return Verification(max_abs_logit_diff=diffs, logit_scale=scale, tolerance=tolerance)
