"""Token streams for training: tokenize once, cache as a memmap, sample batches statelessly.

Cache layout, keyed by content so a changed corpus never reuses stale tokens:

    cache/<corpus-key>-v<vocab>/tokenizer.json      BPE trained on the training split
    cache/<tokens-key>/{train,val}.bin + meta.json   uint16/uint32 token ids, documents joined by <|endoftext|>
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.io import atomic_path, read_json, write_bytes_atomic, write_json_atomic
from edgegpt.tokenizer import (
    PIECE_CHARS, check_vocab_size, end_of_text_id, load_tokenizer, text_pieces, train_tokenizer,
)

CACHE_FORMAT = 1
# Characters encoded per call of tokenizers' encode_batch (which runs its items in parallel).
BATCH_CHARS = 16 * PIECE_CHARS


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray  # [n_train_tokens], memmap
    val: np.ndarray  # [n_val_tokens], memmap
    train_chars: int
    val_chars: int
    key: str  # identifies corpus + tokenizer; recorded in train_state.json


def corpus_key(train_docs: list[str], val_docs: list[str]) -> str:
    h = hashlib.sha256(f"edgegpt-corpus-{CACHE_FORMAT}".encode())
    for split in (train_docs, val_docs):
        h.update(b"\x00split")
        for doc in split:
            h.update(len(doc).to_bytes(8, "little"))
            h.update(doc.encode("utf-8"))
    return h.hexdigest()[:16]


def tokenize(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    """Each document preceded by <|endoftext|>, so every document's first token is predicted from a
    known start and no token attends across a document boundary without seeing the separator."""
    eot = end_of_text_id(tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    arrays: list[np.ndarray] = []
    batch: list[str] = []
    starts: list[bool] = []  # batch[i] begins a document, so end-of-text goes before it

    def encode_batch() -> None:
        for starts_document, encoding in zip(starts, tokenizer.encode_batch(batch, add_special_tokens=False)):
            if starts_document:
                arrays.append(np.array([eot], dtype=dtype))
            arrays.append(np.asarray(encoding.ids, dtype=dtype))
        batch.clear()
        starts.clear()

    # Encodings hold ~200 bytes per token, so they are made a batch of pieces at a time and kept as ids
    # only: a 50 MB file costs its ids, not ~10 GB of Encoding objects.
    batch_chars = 0
    for document in documents:
        for i, piece in enumerate(text_pieces(document)):
            batch.append(piece)
            starts.append(i == 0)
            batch_chars += len(piece)
            if batch_chars >= BATCH_CHARS:
                encode_batch()
                batch_chars = 0
    encode_batch()
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _save_tokens(path: Path, tokens: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        tokens.tofile(tmp)


# Below this many characters, training a tokenizer and tokenizing take well under a second.
SLOW_CORPUS_CHARS = 1_000_000


def prepare_data(
    train_docs: list[str],
    val_docs: list[str],
    vocab_size: int,
    cache_dir: Path,
    tokenizer: Tokenizer | None = None,
    log=lambda message: None,
) -> TokenData:
    """Train the tokenizer (unless given) and tokenize both splits, reusing the cache when it matches."""
    cache_dir = Path(cache_dir)
    key = corpus_key(train_docs, val_docs)
    if sum(map(len, train_docs)) + sum(map(len, val_docs)) < SLOW_CORPUS_CHARS:
        log = lambda message: None  # noqa: E731 - done in well under a second: nothing to announce
    if tokenizer is None:
        tokenizer_path = cache_dir / f"{key}-v{vocab_size}" / "tokenizer.json"
        if tokenizer_path.is_file():
            tokenizer = load_tokenizer(tokenizer_path)
        else:
            check_vocab_size(vocab_size)  # before the progress line: an error must be the only line
            log(f"training a {vocab_size}-token BPE tokenizer")
            tokenizer = train_tokenizer(train_docs, vocab_size)
            write_bytes_atomic(tokenizer_path, tokenizer.to_str().encode())
    tokens_key = hashlib.sha256((key + tokenizer.to_str()).encode()).hexdigest()[:16]
    tokens_dir = cache_dir / tokens_key
    meta_path = tokens_dir / "meta.json"
    if not meta_path.is_file():
        log("tokenizing the corpus")
        train, val = tokenize(tokenizer, train_docs), tokenize(tokenizer, val_docs)
        _save_tokens(tokens_dir / "train.bin", train)
        _save_tokens(tokens_dir / "val.bin", val)
        write_json_atomic(meta_path, {
            "dtype": train.dtype.name, "train_tokens": len(train), "val_tokens": len(val),
            "train_chars": sum(map(len, train_docs)), "val_chars": sum(map(len, val_docs)),
        })
    meta = read_json(meta_path)
    dtype = np.dtype(meta["dtype"])
    return TokenData(
        tokenizer=tokenizer,
        train=np.memmap(tokens_dir / "train.bin", dtype=dtype, mode="r", shape=(meta["train_tokens"],)),
        val=np.memmap(tokens_dir / "val.bin", dtype=dtype, mode="r", shape=(meta["val_tokens"],)),
        train_chars=meta["train_chars"],
        val_chars=meta["val_chars"],
        key=tokens_key,
    )


def sample_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int) -> np.ndarray:
    """Random windows [batch_size, block_size + 1] drawn from (seed, step) alone.

    Stateless on purpose: resuming at step N draws exactly the batches an uninterrupted run would,
    with nothing to save but the step number.
    """
    high = len(tokens) - block_size - 1
    if high < 1:
        raise EdgeGPTError(
            f"the training split has {len(tokens)} tokens, fewer than one window of {block_size + 1}; "
            "add data or lower --block-size"
        )
    starts = np.random.default_rng([seed, step]).integers(0, high, size=batch_size)
    return np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])


def strided_windows(n_tokens: int, block_size: int) -> list[tuple[int, int, int]]:
    """Windows of the model's context with a stride of half a context: every target token is scored
    exactly once, each (after the first window) with at least half a context of history."""
    length = min(block_size, n_tokens - 1)
    stride = max(length // 2, 1)
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
