"""Sliding-window layers keep a window-sized cache (runtime/kv_cache.py): onnxruntime's GroupQueryAttention evicts
what falls out of the window, the runtime never grows those buffers, rolls back only what is still resident and
keeps speculation short of an eviction. PyTorch's model (edgegpt.model, which masks the window itself over the
whole past) is the oracle.

The slack beyond the window is made tiny here (window 8, capacity 12: an eviction every 5 tokens), so a few dozen
tokens go through many evictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgegpt.checkpoint import load_checkpoint, save_checkpoint
from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT
from edgegpt.runtime import kv_cache

WINDOW, SLACK = 8, 4
GEMMA_LIKE = ModelConfig(
    vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=160, max_len=256,
    post_norms=True, activation="gelu_tanh", embed_scale=True, qk_norm=True, query_pre_attn_scalar=24,
    sliding_window=WINDOW, layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    rope_local_theta=100.0, rope_theta=1e6,
)


@pytest.fixture(scope="module")
def sliding_package(tmp_path_factory, tiny_checkpoint):
    """A fused package of a random Gemma-shaped model (weights spread enough that the window matters)."""
    from test_fused import write_package

    _, tokenizer = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(0)
    model = GPT(GEMMA_LIKE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.08)
    root = tmp_path_factory.mktemp("sliding")
    save_checkpoint(root / "ckpt", model, tokenizer)
    return model, write_package(root / "ckpt", root / "package", "static")


@pytest.fixture
def generator(sliding_package, monkeypatch):
    from edgegpt.runtime import Generator

    monkeypatch.setattr(kv_cache, "WINDOW_SLACK", SLACK)
    return Generator.load(sliding_package[1], "cpu")


def reference_logits(model: GPT, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


TOKENS = np.random.default_rng(0).integers(0, 512, 60).tolist()


def test_window_sized_buffers_hold_only_the_window_and_match_pytorch(sliding_package, generator):
    """Token by token past many evictions, and in one prefill longer than the buffer: PyTorch's logits; the
    sliding layers' buffers stay at window + slack positions while the full layer's hold the sequence."""
    model, _ = sliding_package
    expected = reference_logits(model, TOKENS)
    scale = np.abs(expected).max()
    cache = generator.empty_cache()
    for position, token in enumerate(TOKENS):
        logits, cache = generator.forward([token], cache)
        assert np.abs(logits[-1] - expected[position]).max() <= 1e-4 * scale, position
    shapes = {name: buffer.shape()[2] for name, buffer in cache.tensors.items()}
    assert shapes["past_key.0"] == shapes["past_key.2"] == WINDOW + SLACK
    assert shapes["past_key.1"] >= len(TOKENS)
    assert cache.window.resident(len(TOKENS)) < WINDOW + SLACK  # the op evicted
    prefilled, _ = generator.forward(TOKENS, generator.empty_cache())
    assert np.abs(prefilled - expected).max() <= 1e-4 * scale


def test_rollback_within_the_window_is_exact_and_past_an_eviction_is_one_line(sliding_package, generator):
    model, _ = sliding_package
    window = kv_cache.Window(WINDOW, WINDOW + SLACK)
    _, cache = generator.forward(TOKENS[:40], generator.empty_cache())
    # 40 tokens: resident 40 - 5·ceil(28 / 5) = 10; the last eviction was at 38, so 38 and 39 are exact
    assert window.resident(40) == 10 and window.resident(38) == 8
    rolled = cache.truncated(38)
    logits, _ = generator.forward(TOKENS[38:45], rolled)
    expected = reference_logits(model, TOKENS[:45])[38:]
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
    _, cache = generator.forward(TOKENS[:40], generator.empty_cache())
    with pytest.raises(EdgeGPTError) as error:
        cache.truncated(37)
    assert "\n" not in str(error.value) and "evicted" in str(error.value)


@pytest.mark.parametrize("where", [12, 13, 16, 17, 30])
def test_speculative_room_stops_short_of_the_next_eviction(where):
    """Evictions at 13, 18, 23, …: a pass from `where` carries the kept token and at most room guesses, and
    every rollback inside it past the kept token is exact."""
    window = kv_cache.Window(WINDOW, WINDOW + SLACK)
    cache = kv_cache.KVCache({}, where, step=type("Step", (), {"window": window, "capacity": 0})())
    room = cache.speculative_room()
    end = where + 1 + room

    def exact(length: int, total: int) -> bool:
        return window.resident(length) == window.resident(total) - (total - length)

    assert all(exact(length, end) for length in range(where + 1, end + 1))
    assert not all(exact(length, end + 1) for length in range(where + 1, end + 2))  # one more guess would not be


@pytest.mark.slow  # tens of decode passes with and without guesses
def test_speculation_and_batches_on_a_sliding_model_decode_as_plain_greedy(sliding_package, generator):
    """A draft (the model itself: every guess right, so passes are as long as the room allows) and lookup
    guesses across many evictions, and a batch of rows of different lengths: plain greedy's tokens."""
    from edgegpt.runtime import Generator

    prompt = TOKENS[:6] * 3  # repeats, so lookup finds guesses
    plain = generator.generate_ids(prompt, max_new_tokens=40, temperature=0, stop_at_eos=False)
    with_draft = Generator.load(sliding_package[1], "cpu", draft=sliding_package[1])
    assert with_draft.generate_ids(prompt, max_new_tokens=40, temperature=0, stop_at_eos=False) == plain
    assert generator.generate_ids(prompt, max_new_tokens=40, temperature=0, stop_at_eos=False, lookup=True) == plain
    texts = [generator.package.tokenizer.decode(TOKENS[:n]) for n in (5, 23, 41)]
    alone = [generator.generate(text, max_new_tokens=20, temperature=0, stop_at_eos=False) for text in texts]
    assert generator.generate_batch(texts, max_new_tokens=20, temperature=0, stop_at_eos=False) == alone
