"""Check an exported float32 graph against the PyTorch model it came from, relative to the model's scale.

At past lengths 0, 1 and 37 (as far as the context allows): prefill `past` random tokens, then run
NEW_TOKENS more on top of the returned cache, and compare every position of both calls with PyTorch's.
The graph runs through the runtime's Generator, so the check covers what an app runs, whichever
cache layout the graph has (the plain graph's concat cache or the fused graph's static buffer).

    error = max |Δ log-probability| over every position and token  /  max |logit| PyTorch produced

Log-probabilities, because that is what sampling and perplexity see (a constant added to a row of logits
changes nothing); divided by the largest logit, because float32 rounding is relative: a 30-layer model
with logits of ~35 differs from PyTorch by 1.7e-4 in absolute terms for reasons that are not bugs, a
4-layer toy by 4e-6, and both are ~1e-6 to 1e-5 of their scale. The float32 graph must stay within
FLOAT32_TOLERANCE (a quality gate, export/gates.py); quantized and float16 graphs are judged on real text
instead (edgegpt/quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT
from edgegpt.reference import torch_threads
from edgegpt.scoring import log_softmax

PAST_LENGTHS = (0, 1, 37)
NEW_TOKENS = 8  # tokens run on top of each past
# Bound on max |Δ log-probability| / max |logit| (see the module docstring), measured with these very calls
# (the fused float32 graph through the runtime vs PyTorch). Real exports, from tiny random models to
# SmolLM2-135M (whose absolute logit differences an absolute 1e-4 refused), stay more than an order of
# magnitude below it; every injected bug (a wrong rotary theta, swapped K and V, seqlens_k off by one, a
# final norm without its weight) lands more than an order of magnitude above it. tests/test_gate_bugs.py
# holds both margins; docs/quantization.md#the-quality-gates explains the gate.
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

    max_abs_logprob_diff: dict[int, float]  # max |Δ log p| by past length: what the gate judges
    max_abs_logit_diff: dict[int, float]  # by past length, for the record (grows with the model's scale)
    logit_scale: float  # the largest |logit| PyTorch produced in those runs
    tolerance: float  # bound on relative_error (FLOAT32_TOLERANCE)

    @property
    def relative_error(self) -> float:
        """max |Δ log-probability| / max |logit|; 0 when both are 0, inf for any difference on all-zero logits."""
        diffs = list(self.max_abs_logprob_diff.values())
        worst = float(np.max(diffs)) if diffs else 0.0  # np.max keeps a NaN (which then fails)
        if self.logit_scale > 0:
            return worst / self.logit_scale
        return 0.0 if worst == 0 else float("inf")

    @property
    def passed(self) -> bool:
        return bool(self.relative_error <= self.tolerance)  # NaN fails

    def to_dict(self) -> dict:
        return {
            "metric": "max |Δ log-probability| / max |logit|",
            "relative_error": self.relative_error,
            "tolerance": self.tolerance,
            "max_abs_logprob_diff": {str(k): v for k, v in self.max_abs_logprob_diff.items()},
            "max_abs_logit_diff": {str(k): v for k, v in self.max_abs_logit_diff.items()},
            "logit_scale": self.logit_scale,
            "passed": self.passed,
        }


def verify_generator(reference: Reference, generator, tolerance: float = FLOAT32_TOLERANCE) -> Verification:
    """Compare a runtime Generator (over the graph to check) with PyTorch's answers."""
    logprob_diffs, logit_diffs = {}, {}
    for past_len, calls in reference.calls.items():
        cache, logprob, logit = generator.empty_cache(), [], []
        for ids, expected in calls:
            got, cache = generator.forward(ids, cache)
            got = np.asarray(got, np.float32)
            logit.append(np.abs(got - expected).max())
            logprob.append(np.abs(log_softmax(got) - log_softmax(expected)).max())
        # np.max, not max(): a NaN from the graph must propagate and fail the gate, not compare as smaller.
        logprob_diffs[past_len], logit_diffs[past_len] = float(np.max(logprob)), float(np.max(logit))
    return Verification(max_abs_logprob_diff=logprob_diffs, max_abs_logit_diff=logit_diffs,
                        logit_scale=reference.logit_scale, tolerance=tolerance)
