"""Tokenizer round trips and the streaming detokenizer (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from edgegpt.runtime.detokenizer import REPLACEMENT, StreamDecoder
from edgegpt.tokenizer import train_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?",
    "chinese": "我们今天去公园散步，天气很好。机器学习模型在桌面应用中运行。",
    "emoji": "ok 👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 rainbow 🏳️‍🌈 heart ❤️ done",
    "code": "def f(x):\n\treturn x  \n\n\tif x:\t# tab\n        pass   \n",
    "mixed": "naïve café — 日本語 and 한국어, ∑ x² ≤ ∞ 🚀\r\n  trailing  ",
    "edge": " leading space, \u200b zero width, a lone \ufffd replacement char",
}


@pytest.fixture(scope="module")
def tokenizer(corpus_text):
    return train_tokenizer([corpus_text], 512)


def stream_pieces(tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip_is_exact(tokenizer, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", TEXTS)
def test_stream_equals_full_decode(tokenizer, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text).ids
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == text
    if REPLACEMENT not in text:
        assert not any(REPLACEMENT in p for p in pieces)


def test_stream_never_splits_a_character(tokenizer):
    # A vocabulary trained on English text has no merges for these, so each character spans tokens.
    text = "🇯🇵👨‍👩‍👧‍👦机器"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text), "the test needs characters split across tokens"
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)
    # Every piece is whole characters: each re-encodes to bytes that start a UTF-8 character.
    assert all((p.encode()[0] & 0xC0) != 0x80 for p in pieces)


@pytest.mark.parametrize("seed", range(20))
def test_stream_equals_full_decode_for_random_ids(tokenizer, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, tokenizer.get_vocab_size(), size=int(rng.integers(1, 200))).tolist()
    full = tokenizer.decode(ids)
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in p for p in pieces)


def test_stream_of_byte_tokens_holds_until_the_character_completes(tokenizer):
    # "é" is two bytes; feed them as single-byte tokens: nothing until the second arrives.
    byte_ids = [tokenizer.token_to_id(t) for t in tokenizer.encode("é").tokens]
    assert len(byte_ids) == 2
    decoder = StreamDecoder(tokenizer)
    assert decoder.push(byte_ids[0]) == ""
    assert decoder.push(byte_ids[1]) == "é"
    assert decoder.flush() == ""


def test_incomplete_tail_is_flushed_as_the_full_decode_has_it(tokenizer):
    first_byte = tokenizer.encode("é").ids[:1]
    ids = tokenizer.encode("ab").ids + first_byte
    assert "".join(stream_pieces(tokenizer, ids)) == tokenizer.decode(ids) == "ab" + REPLACEMENT


def test_stream_window_stays_bounded(tokenizer):
    decoder = StreamDecoder(tokenizer)
    ids = tokenizer.encode(TEXTS["english"] * 50).ids
    pieces = [decoder.push(i) for i in ids]
    assert len(decoder._ids) < 8, "the detokenizer kept the whole history: decoding would be O(n²)"
    assert "".join(pieces) + decoder.flush() == TEXTS["english"] * 50
