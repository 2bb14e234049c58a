"""Next-token selection: each option must change the outcome when it is set, and only then."""

from __future__ import annotations

import numpy as np
import pytest

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.detokenizer import StopStrings, partial_match
from edgegpt.runtime.sampling import (
    Sampler,
    SamplingParams,
    check_sampling,
    min_p_filter,
    next_token,
    occurrence_penalty_filter,
    repetition_penalty_filter,
    softmax,
    top_k_filter,
    top_p_filter,
)

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


# -- min-p, repetition penalty, the Sampler ------------------------------------------------------------


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top_probability():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isfinite(min_p_filter(logits, 0.5)).tolist() == [True, True, False, False]
    assert np.isfinite(min_p_filter(logits, 0.1)).tolist() == [True, True, True, True]
    assert np.isfinite(min_p_filter(logits, 1.0)).tolist() == [True, False, False, False]
    assert min_p_filter(logits, 0.0) is logits


def test_min_p_limits_sampling():
    logits = flat_logits()
    logits[3] = 1.9  # a close second: min_p 0.5 keeps exactly ids 7 and 3
    assert set(draw(logits, temperature=1.0, min_p=0.5)) == {3, 7}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 2.0, -2.0])
    seen = np.array([True, True, False, False])
    assert repetition_penalty_filter(logits, seen, 2.0).tolist() == [1.0, -4.0, 2.0, -2.0]
    assert repetition_penalty_filter(logits, seen, 1.0) is logits


def test_repetition_penalty_changes_the_greedy_choice_only_for_seen_tokens():
    logits = np.array([3.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    assert next_token(logits, rng, repetition_penalty=2.0, seen=np.array([True, False, False])) == 1
    assert next_token(logits, rng, repetition_penalty=2.0, seen=np.array([False, False, True])) == 0


def test_sampler_counts_prompt_and_chosen_tokens_as_seen():
    logits = np.array([3.0, 2.9, 2.8, 0.5, 9.0])
    sampler = Sampler(SamplingParams(repetition_penalty=100.0), None, [0], vocab_size=4)
    assert [sampler.choose(logits) for _ in range(3)] == [1, 2, 3]  # 0 is in the prompt; id 4 is past the vocab
    assert Sampler(SamplingParams(), None, [0], 4).choose(logits) == 0  # no penalty: plain argmax


def test_sampler_same_seed_same_draws():
    logits = flat_logits()
    params = SamplingParams(temperature=1.0, top_k=20, min_p=0.01, repetition_penalty=1.3)
    samplers = [Sampler(params, seed, [1, 2], VOCAB) for seed in (5, 5, 6)]
    draws = [[s.choose(logits) for _ in range(40)] for s in samplers]
    assert draws[0] == draws[1] != draws[2]


@pytest.mark.parametrize("min_p, penalty", [(-0.1, 1.0), (1.1, 1.0), (float("nan"), 1.0), (0.0, 0.0), (0.0, -1.0),
                                            (0.0, float("inf")), (0.0, True)])
def test_invalid_min_p_and_penalty_raise(min_p, penalty):
    with pytest.raises(EdgeGPTError):
        check_sampling(1.0, 0, 1.0, min_p, penalty)


def test_presence_and_frequency_penalties_subtract_per_generated_occurrence():
    logits = np.array([1.0, 1.0, 1.0])
    counts = np.array([0, 1, 3])
    assert occurrence_penalty_filter(logits, counts, 0.5, 0.25).tolist() == [1.0, 0.25, -0.25]
    assert occurrence_penalty_filter(logits, counts, 0.0, 0.0) is logits


def test_the_occurrence_penalties_count_generated_tokens_not_the_prompt():
    logits = np.array([3.0, 2.5, 2.0])
    frequency = Sampler(SamplingParams(frequency_penalty=0.4), None, [0, 0, 0], vocab_size=3)
    assert [frequency.choose(logits) for _ in range(4)] == [0, 0, 1, 0]  # 3.0 - 0.4n against 2.5
    presence = Sampler(SamplingParams(presence_penalty=2.0), None, [0], vocab_size=3)
    assert [presence.choose(logits) for _ in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("presence, frequency", [(2.5, 0.0), (0.0, -2.1), (float("nan"), 0.0), (True, 0.0)])
def test_invalid_occurrence_penalties_raise(presence, frequency):
    with pytest.raises(EdgeGPTError, match="penalty must be a number in \\[-2, 2\\]"):
        check_sampling(1.0, 0, 1.0, 0.0, 1.0, presence, frequency)


# -- stop strings ---------------------------------------------------------------------------------------


def feed(stops, pieces) -> tuple[list[str], bool]:
    stop = StopStrings(tuple(stops))
    shown = [stop.push(p) for p in pieces]
    if not stop.stopped:
        shown.append(stop.flush())
    return shown, stop.stopped


def test_stop_string_split_over_pieces_is_caught_and_never_shown():
    shown, stopped = feed(["</s>"], ["Hello <", "/", "s> world"])
    assert stopped and "".join(shown) == "Hello " and shown[0] == "Hello "


def test_held_back_text_is_released_when_it_is_not_a_stop_string():
    shown, stopped = feed(["\n\n"], ["a\n", "b", "\n"])
    assert not stopped and shown == ["a", "\nb", "", "\n"]


def test_the_earliest_stop_string_wins():
    assert feed(["c", "ab"], ["xabc"]) == (["x"], True)
    assert feed([], ["no stops"]) == (["no stops", ""], False)


def test_partial_match():
    assert partial_match("hello wor", "world") == 3
    assert partial_match("hello", "world") == 0
    assert partial_match("xx", "x") == 0  # a whole stop string is found by find(), not held back
