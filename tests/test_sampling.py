"""Next-token selection: each option must change the outcome when it is set, and only then."""

from __future__ import annotations

import numpy as np
import pytest

from edgegpt.errors import EdgeGPTError
from edgegpt.runtime.sampling import check_sampling, next_token, softmax, top_k_filter, top_p_filter

VOCAB = 50


def flat_logits(seed: int = 0) -> np.ndarray:
    """Nearly uniform logits with one clear favourite (id 7): sampling rarely picks it by chance."""
    logits = np.random.default_rng(seed).normal(0.0, 0.1, VOCAB).astype(np.float32)
    logits[7] = 2.0
    return logits


def draw(logits, n=300, seed=0, **options) -> list[int]:
    rng = np.random.default_rng(seed)
    return [next_token(logits, rng, **options) for _ in range(n)]


def test_greedy_picks_argmax():
    logits = flat_logits()
    logits[31] = 5.0
    assert set(draw(logits, n=20, temperature=0.0)) == {31}


def test_greedy_ignores_top_k_and_top_p_and_uses_no_randomness():
    logits = flat_logits()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert next_token(logits, rng, temperature=0.0, top_k=5, top_p=0.5) == 7
    assert rng.bit_generator.state == state


def test_sampling_without_filters_spreads_over_the_vocabulary():
    # The baseline the filter tests below are measured against.
    assert len(set(draw(flat_logits(), temperature=1.0))) > 30


def test_top_k_1_is_greedy_even_at_high_temperature():
    assert set(draw(flat_logits(), temperature=5.0, top_k=1)) == {7}


def test_top_k_limits_choices_to_the_k_most_likely():
    logits = flat_logits()
    allowed = set(np.argsort(-logits)[:5].tolist())
    tokens = set(draw(logits, temperature=5.0, top_k=5))
    assert tokens <= allowed and len(tokens) == 5


def test_tiny_top_p_is_greedy():
    assert set(draw(flat_logits(), temperature=5.0, top_p=1e-6)) == {7}


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [True, False, False, False]
    assert np.isfinite(top_p_filter(logits, 0.75)).tolist() == [True, True, False, False]
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert np.isfinite(top_p_filter(logits, 1.0)).all()


def test_top_k_filter_keeps_exactly_k_even_with_ties():
    logits = np.zeros(10)
    assert np.isfinite(top_k_filter(logits, 3)).sum() == 3
    assert top_k_filter(logits, 0) is logits


def test_temperature_changes_the_distribution():
    logits = flat_logits()
    cold = draw(logits, n=400, temperature=0.3)
    hot = draw(logits, n=400, temperature=3.0)
    # softmax(2.0 / 0.3) puts most mass on id 7; at 3.0 it is nearly uniform.
    assert cold.count(7) > 300
    assert hot.count(7) < 60


def test_sampling_follows_the_probabilities():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    counts = np.bincount(draw(logits, n=5000, temperature=1.0), minlength=3) / 5000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)
    assert np.allclose(softmax(logits), [0.7, 0.2, 0.1])


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = flat_logits()
    a = draw(logits, n=50, seed=123, temperature=1.0, top_k=20, top_p=0.9)
    b = draw(logits, n=50, seed=123, temperature=1.0, top_k=20, top_p=0.9)
    c = draw(logits, n=50, seed=124, temperature=1.0, top_k=20, top_p=0.9)
    assert a == b
    assert a != c


def test_never_samples_a_filtered_token():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf])
    assert set(draw(logits, n=500, temperature=1.0)) == {0, 2}


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(-0.1, 0, 1.0), (float("nan"), 0, 1.0), (float("inf"), 0, 1.0), ("1", 0, 1.0),
     (1.0, -1, 1.0), (1.0, 2.5, 1.0), (1.0, True, 1.0),
     (1.0, 0, 0.0), (1.0, 0, 1.5), (1.0, 0, -0.1)],
)
def test_invalid_values_raise(temperature, top_k, top_p):
    with pytest.raises(EdgeGPTError):
        check_sampling(temperature, top_k, top_p)


def test_valid_edges_are_accepted():
    check_sampling(0, 0, 1.0)
    check_sampling(0.7, 40, 1e-9)
    check_sampling(np.float32(1.0), np.int64(3), 1)
