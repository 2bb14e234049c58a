"""Token streams for training: tokenize once, cache as a memmap, sample batches statelessly.

Cache layout, keyed by content so a changed corpus never reuses stale tokens:

    cache/<corpus-key>-v<vocab>/tokenizer.json      BPE trained on the training split
    cache/<tokens-key>/{train,val}.bin + meta.json   uint16/uint32 token ids, documents joined by <|endoftext|>
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import TOKENIZER
from edgegpt.core.io import atomic_path, read_json, write_bytes_atomic, write_json_atomic
from edgegpt.tokenizer import (
    PIECE_CHARS,
    check_vocab_size,
    end_of_text_id,
    load_tokenizer,
    text_pieces,
    train_tokenizer,
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

    # Encodings hold a few hundred bytes per token, so they are made a batch of pieces at a time and kept as
    # ids only: a 50 MB file costs its ids, not gigabytes of Encoding objects.
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
        tokenizer_path = cache_dir / f"{key}-v{vocab_size}" / TOKENIZER
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


def grid_windows(n_tokens: int, block_size: int) -> int:
    """Windows of the fixed grid over `n_tokens` tokens: window i is tokens [i·block, i·block + block + 1)."""
    return (n_tokens - 1) // block_size


def sample_grid(n_windows: int, rows: int, seed: int, step: int) -> np.ndarray:
    """The fixed-grid windows [rows] of `step`, drawn from (seed, step) alone like sample_batch: the steps' rows
    in a row make epochs, and each epoch visits every window once, in an order drawn from (seed, epoch).

    A package teacher's top-k cache (edgegpt.train.teacher_cache) keeps what the teacher said about each window,
    so a window must recur exactly: random starts, as sample_batch draws them, would almost never repeat."""
    if n_windows < 1:
        raise EdgeGPTError("the training split is shorter than one window; add data or lower --block-size")
    epochs, positions = np.divmod(np.arange(step * rows, (step + 1) * rows, dtype=np.int64), n_windows)
    windows = np.empty(rows, np.int64)
    for epoch in np.unique(epochs):
        of_epoch = epochs == epoch
        windows[of_epoch] = _epoch_order(seed, int(epoch), n_windows)[positions[of_epoch]]
    return windows


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    # Cached: an epoch's order is drawn once, not at each of its steps (a permutation of a million windows
    # takes a few milliseconds).
    order = np.random.default_rng([seed, epoch, n_windows]).permutation(n_windows)
    order.flags.writeable = False
    return order


def grid_batch(tokens: np.ndarray, windows: np.ndarray, block_size: int) -> np.ndarray:
    """The tokens [len(windows), block_size + 1] of fixed-grid windows."""
    return np.stack([np.asarray(tokens[w * block_size : w * block_size + block_size + 1], dtype=np.int64)
                     for w in windows.tolist()])
