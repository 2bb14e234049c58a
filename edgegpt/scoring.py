"""The one scoring path: held-out tokens in windows -> nats per token, nats per character, perplexity.

    tokens ─► strided_windows (windows of `window` tokens, stride half a window: every target scored
              once, each after the first window with at least half a window of history)
           ─► logit_chunks(windows [B, L], skip) ─► -log p(target) ─► Score: nats/token, nats/char, perplexity,
                                                                          top-1

Training's validation (PyTorch), `edgegpt eval` and the export gates (packages through the runtime, and
the PyTorch reference), and the benchmarks all score through `score`. Numpy only: the model is any
function from a batch of windows to the float32 logits of positions skip.. (positions before `skip` are
history no window of the batch scores, so a model may leave their logits out), handed over a few positions
at a time: chunks [B, n, vocab] of consecutive positions. A window's logits whole are window × vocab floats
(a 262k vocabulary: 1 GiB per 1,024 tokens); a chunk of about LOGIT_VALUES floats is consumed before the next is
made (and a graph's own temporaries of that shape, such as a final soft-cap's, are as small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

# `edgegpt eval` and the export's gates score this many held-out tokens by default. Quantization error is
# systematic (both models score the same text), so this many tokens resolve a change far below 1%.
DEFAULT_EVAL_TOKENS = 16384
# The scoring window unless --window says otherwise: min(the model's context, this). A window the size of
# a long context makes scoring slow (attention grows with the window) and refuses texts shorter than one
# context; with 1,024 tokens every target after the first window keeps 512 to 1,023 tokens of history,
# and a long-context model such as SmolLM2 scores much faster than in windows of its whole context.
DEFAULT_WINDOW = 1024
# Below this many tokens a perplexity says little and the greedy prompts no longer fit: refuse the text.
MIN_EVAL_TOKENS = 128
# The smallest --window: the greedy checks continue 32-token prompts inside one window (quality.py).
MIN_WINDOW = 16

# Logits a scorer hands over at once (64 MiB of float32): 256 positions of a 65k vocabulary, 64 of a 262k one.
LOGIT_VALUES = 1 << 24
# ... and at most this many positions per window, even for a small vocabulary: a package's pass over this many
# tokens is as fast per token as a longer one.
MAX_CHUNK_POSITIONS = 256

Window = tuple[int, int, int]  # (start, length, first): inputs tokens[start : start + length], targets
#                                shifted by one, only targets at offsets >= first counted


@dataclass
class Score:
    """Nats summed over the scored targets, how many, the characters they cover, and each argmax."""

    nats: float
    tokens: int
    chars: int
    top1: np.ndarray  # the argmax at every scored position, in window order

    @property
    def nats_per_token(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def nats_per_char(self) -> float:
        return self.nats / max(self.chars, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)


def score(
    logit_chunks: Callable[[np.ndarray, int], Iterable[np.ndarray]],
    tokens: np.ndarray,
    windows: Sequence[Window],
    char_table: np.ndarray,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Score:
    """Score `windows` of `tokens`, `batch_size` windows per call of logit_chunks(batch, skip) (windows of one
    length; it yields float32 [B, n, vocab] for positions skip.. in order, module doc); progress(done, total)
    after each batch."""
    nats, scored, chars, top1 = 0.0, 0, 0, []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        length = chunk[0][1]
        batch = np.stack([np.asarray(tokens[start : start + length + 1], dtype=np.int64) for start, _, _ in chunk])
        skip = min(first for _, _, first in chunk)
        rows_top1: list[list[np.ndarray]] = [[] for _ in chunk]
        position = skip  # the window position of the chunk's first row of logits
        for logits in logit_chunks(batch[:, :-1], skip):
            end = position + logits.shape[1]
            for row, (_, _, first) in enumerate(chunk):
                begin = max(first, position)
                if begin >= end:
                    continue
                targets = batch[row, 1 + begin : 1 + end]
                scored_logits = logits[row, begin - position :]
                nats += float(target_nats(scored_logits, targets).sum())
                chars += int(char_table[targets].sum())
                scored += len(targets)
                rows_top1[row].append(scored_logits.argmax(axis=-1))
            position = end
        top1 += [np.concatenate(parts) for parts in rows_top1 if parts]
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))
    return Score(nats, scored, chars, np.concatenate(top1) if top1 else np.zeros(0, np.int64))


def chunk_starts(length: int, skip: int, batch: int, vocab: int) -> range:
    """Where each chunk of a batch of windows starts: about LOGIT_VALUES logits per chunk, at least a position
    and at most MAX_CHUNK_POSITIONS per window."""
    positions = LOGIT_VALUES // max(batch * vocab, 1)
    return range(skip, length, min(max(positions, 1), MAX_CHUNK_POSITIONS))


# Rows of logits target_nats works on at once: its scratch is this many rows of the vocabulary (64 MiB of a
# 262k one, Gemma's), not the whole window's.
TARGET_ROWS = 64


def target_nats(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row of logits [n, vocab]: the max-shifted exps in float32 (each
    within an ulp), summed in float64. One scratch array per TARGET_ROWS rows, written in place: a window of
    a 49k vocabulary is 100 MB of logits (a 262k one over 500 MB), and fresh temporaries of that size cost
    more in page faults than the arithmetic, and memory beside the model's own."""
    nats = np.empty(len(targets), np.float64)
    for start in range(0, len(targets), TARGET_ROWS):
        rows = logits[start : start + TARGET_ROWS]
        top = rows.max(axis=-1, keepdims=True)
        exps = np.subtract(rows, top, dtype=np.float32)
        np.exp(exps, out=exps)
        lse = top[:, 0].astype(np.float64) + np.log(exps.sum(axis=-1, dtype=np.float64))
        nats[start : start + len(rows)] = lse - rows[np.arange(len(rows)), targets[start : start + TARGET_ROWS]]
    return nats


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of logits [..., vocab], whole rows (target_nats when only the targets'
    are needed): a comparison of two models' log-probabilities adds no rounding of its own."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def strided_windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """Windows of `window` tokens (fewer when the text is shorter) with a stride of half a window: every
    target token is scored exactly once, each (after the first window) with at least half a window of
    history."""
    length = min(window, n_tokens - 1)
    stride = window_stride(length)
    windows, scored_until = [], 0  # targets are token indices 1..n_tokens-1
    start = 0
    while scored_until < n_tokens - 1:
        start = min(start, n_tokens - 1 - length)
        last_target = start + length
        first = scored_until - start  # offset of the first target not yet scored
        windows.append((start, length, first))
        scored_until = last_target
        start += stride
    return windows


def window_stride(window: int) -> int:
    """Half a window: each target after the first window keeps at least that much history."""
    return max(window // 2, 1)


def sample_windows(n_tokens: int, block_size: int, n_windows: int) -> list[Window]:
    """n evenly spaced full windows, every target scored: a quick estimate for training's progress."""
    length = min(block_size, n_tokens - 1)
    starts = np.linspace(0, n_tokens - length - 1, num=n_windows).astype(int)
    return [(int(start), length, 0) for start in sorted(set(starts.tolist()))]


def char_starts_table(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """For each token id, how many UTF-8 characters begin inside its bytes.

    Summed over any contiguous run of tokens this counts exactly the characters the run covers, even
    when byte-level tokens split a character, which is what nats-per-character needs.
    """
    byte_of = {ch: i for i, ch in enumerate(_byte_level_alphabet_order())}
    table = np.zeros(vocab_size, dtype=np.int64)
    special = set(tokenizer.get_added_tokens_decoder())  # <|endoftext|> stands for no text: 0 characters
    vocab = tokenizer.get_vocab()
    sentencepiece_style = any("\u2581" in token for token in vocab)  # a teacher's (Llama 2, Mistral, ...)
    for token, token_id in vocab.items():
        if token_id < vocab_size and token_id not in special:
            raw = _sentencepiece_bytes(token) if sentencepiece_style else bytes(byte_of[ch] for ch in token)
            table[token_id] = sum(1 for b in raw if b & 0xC0 != 0x80)
    return table


def _sentencepiece_bytes(token: str) -> bytes:
    """A byte-fallback token <0xNN> is one byte; other entries are text with ▁ for a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def _byte_level_alphabet_order() -> list[str]:
    """GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
