"""The one decode loop's stop rules (runtime/decoding.py), without a model: accepting a run of tokens at
once keeps exactly what accepting them one by one keeps, whichever rule ends the run inside it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgegpt.runtime.decoding import Decoding, greedy
from edgegpt.runtime.detokenizer import TextStream

EOS = 0


@pytest.fixture(scope="module")
def tokenizer():
    from edgegpt.tokenizer import train_tokenizer

    return train_tokenizer(["the cat sat on the mat.\n\nthe dog ran.\n\n" * 50], 300)


def one_by_one(tokens, **kwargs):
    decoding = Decoding(**kwargs)
    for token in tokens:
        if decoding.done:
            break
        decoding.accept([token])
    return decoding


@pytest.mark.parametrize(
    "tokens, kwargs, kept, reason",
    [
        ([5, 6, EOS, 7], dict(prompt_length=3, max_new_tokens=10, max_length=100, eos_ids=[EOS]), 2, "eos"),
        ([5, 6, EOS, 7], dict(prompt_length=3, max_new_tokens=10, max_length=100, eos_ids=[EOS], stop_at_eos=False),
         4, None),
        ([5, 6, 7, 8], dict(prompt_length=3, max_new_tokens=3, max_length=100), 3, "length"),
        # Token n needs position prompt + n - 1 to be fed: with 5 positions and a 3-token prompt, the third
        # token is chosen from a full context and never fed.
        ([5, 6, 7, 8], dict(prompt_length=3, max_new_tokens=10, max_length=5), 3, "max_length"),
        ([5, 6, 7, 8], dict(prompt_length=3, max_new_tokens=10, max_length=100, eos_ids=[1, 7]), 2, "eos"),
    ],
)
def test_a_run_of_tokens_keeps_what_one_by_one_keeps(tokens, kwargs, kept, reason):
    at_once = Decoding(**kwargs)
    assert at_once.accept(tokens) == kept
    alone = one_by_one(tokens, **kwargs)
    assert at_once.tokens == alone.tokens == tokens[:kept]
    assert at_once.finish_reason == alone.finish_reason == reason
    assert at_once.fed == kwargs["prompt_length"] + max(kept - 1, 0)


def test_nothing_is_kept_after_the_end():
    decoding = Decoding(prompt_length=1, max_new_tokens=2, max_length=10)
    assert decoding.accept([4, 5, 6]) == 2 and decoding.done
    assert decoding.accept([7]) == 0 and decoding.tokens == [4, 5]


def test_zero_new_tokens_is_done_before_the_prompt_runs():
    decoding = Decoding(prompt_length=4, max_new_tokens=0, max_length=10)
    calls = []
    assert list(decoding.run(lambda: calls.append("prefill"), lambda t: calls.append(t), lambda logits: 1)) == []
    assert decoding.finish_reason == "length" and calls == []


def test_a_stop_string_inside_a_run_ends_it_and_never_shows(tokenizer):
    ids = tokenizer.encode("the cat sat.\n\nthe dog ran").ids
    decoding = Decoding(prompt_length=1, max_new_tokens=100, max_length=1000, text=TextStream(tokenizer, ("\n\n",)))
    kept = decoding.accept(ids)
    assert decoding.finish_reason == "stop" and 0 < kept < len(ids)
    assert decoding.take_text() == "the cat sat."
    alone = one_by_one(ids, prompt_length=1, max_new_tokens=100, max_length=1000,
                       text=TextStream(tokenizer, ("\n\n",)))
    assert alone.tokens == decoding.tokens


def test_text_pieces_join_to_the_decode_of_the_kept_tokens(tokenizer):
    ids = tokenizer.encode("the mat. the dog sat on the cat.").ids
    decoding = Decoding(prompt_length=1, max_new_tokens=7, max_length=1000, text=TextStream(tokenizer))
    pieces = []
    for start in range(0, len(ids), 3):
        decoding.accept(ids[start : start + 3])
        pieces.append(decoding.take_text())
    assert decoding.finish_reason == "length"
    assert "".join(pieces) == tokenizer.decode(ids[:7])


def test_cancel_is_checked_before_each_forward_pass():
    cancel = threading.Event()
    fed = []

    def feed(token):
        fed.append(token)
        if len(fed) == 3:
            cancel.set()
        return np.zeros(4)

    decoding = Decoding(prompt_length=1, max_new_tokens=100, max_length=1000, cancel=cancel)
    tokens = list(decoding.run(lambda: np.zeros(4), feed, lambda logits: 2))
    assert decoding.finish_reason == "cancelled"
    assert len(tokens) == 4 and len(fed) == 3  # the token chosen after the third feed is kept, never fed


def test_greedy_is_exactly_n_tokens_through_end_of_text():
    logits = np.eye(5)
    seen = []

    def feed(token):
        seen.append(token)
        return logits[(token + 1) % 5]

    assert greedy(lambda: logits[3], feed, prompt_length=2, n_tokens=6) == [3, 4, 0, 1, 2, 3]
    assert seen == [3, 4, 0, 1, 2]
