"""Scoring takes logits a chunk of positions at a time (edgegpt.scoring): however a scorer cuts its windows
into chunks, the score is the one of the whole windows, and no scorer holds a window's logits at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgegpt import scoring
from edgegpt.core.config import preset
from edgegpt.model import GPT
from edgegpt.reference import TorchReference
from edgegpt.scoring import sample_windows, score, strided_windows


def whole_and_cut(logits_of, sizes):
    """Two chunkers over one function of whole windows: all positions at once, and chunks of the given sizes."""
    def whole(windows, skip):
        yield logits_of(windows, skip)

    def cut(windows, skip):
        full, position, i = logits_of(windows, skip), 0, 0
        while position < full.shape[1]:
            size = sizes[i % len(sizes)]
            yield full[:, position : position + size]
            position, i = position + size, i + 1
    return whole, cut


@pytest.mark.parametrize("batch_size", [1, 3])
def test_any_cut_into_chunks_scores_as_the_whole_windows(batch_size):
    rng = np.random.default_rng(0)
    vocab, tokens = 50, np.random.default_rng(1).integers(0, 50, 300)
    table = rng.normal(size=(vocab, vocab)).astype(np.float32)

    def logits_of(windows, skip):  # a deterministic "model": logits from the current token
        return table[windows[:, skip:]]

    whole, cut = whole_and_cut(logits_of, [1, 7, 3, 64])
    chars = np.ones(vocab, np.int64)
    for windows in (strided_windows(len(tokens), 64), sample_windows(len(tokens), 40, 5)):
        a = score(whole, tokens, windows, chars, batch_size)
        b = score(cut, tokens, windows, chars, batch_size)
        assert (a.tokens, a.chars) == (b.tokens, b.chars) and a.tokens > 0
        assert b.nats == pytest.approx(a.nats, rel=1e-12)
        np.testing.assert_array_equal(a.top1, b.top1)


@pytest.mark.parametrize("skip", [0, 5, 31])
def test_the_reference_hands_over_chunks_of_its_full_forward(monkeypatch, skip):
    monkeypatch.setattr(scoring, "LOGIT_VALUES", 16 * 512)  # several chunks from a short window: 8 positions
    torch.manual_seed(0)
    model = GPT(preset("nano", max_len=64)).eval()
    windows = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 40))
    chunks = list(TorchReference(model).logit_chunks(windows, skip))
    assert len(chunks) > 1 and all(c.shape[0] == 2 and c.shape[1] <= 8 for c in chunks)
    with torch.no_grad():
        full = model(torch.from_numpy(windows)).numpy()[:, skip:]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=0, atol=1e-5)
