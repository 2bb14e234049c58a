"""Short training examples packed into full rows, and the batches drawn from them.

    examples (ids, trained) ─► pack_examples ─► PackedRows ─► sample_rows(rows, n, seed, step) ─► a batch

A row holds block_size + 1 tokens: the model reads tokens[:, :-1] and predicts tokens[:, 1:]. Several
examples share a row without seeing each other: `documents` says which example each token belongs to
(0, 1, 2, ... within the row; -1 for padding), and the model attends only within one example, its
positions restarting at each (GPT.forward(input_ids, documents=...)). A label counts when the loss mask
says so: the target is a token the example trains on, and it continues the same example as its input
(an example's first token is never predicted from the example before it; padding is never a target).

Packing is best-fit decreasing: examples longest first (file order among equal lengths), each into the
fullest row it still fits, else a new row. It fills rows about as well as first-fit decreasing (both
leave a small fraction of a row per row empty when examples are short) and runs in n log n with a
sorted list of the rows' free space. Greedy packing in file order closes a row at the first example
that does not fit, which wastes more when lengths vary; the order within a row does not matter to the
model (examples do not attend across), and sample_rows shuffles rows each epoch, so nothing is lost
by sorting. Deterministic: the same examples always give the same rows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

PADDING = -1  # `documents` value of a padding token


@dataclass
class PackedRows:
    """Examples packed into rows of block_size + 1 tokens.

    tokens     int32 [rows, block_size + 1]   token ids (padding: pad_id)
    loss_mask  bool  [rows, block_size]       loss_mask[r, t]: the label tokens[r, t + 1] is trained
    documents  int32 [rows, block_size + 1]   the example each token belongs to within its row, -1 padding
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    documents: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def trained_tokens(self) -> int:
        """Labels the loss counts, over all rows."""
        return int(self.loss_mask.sum())

    @property
    def filled(self) -> float:
        """The fraction of the rows' tokens that belong to an example (1.0: no padding)."""
        return float((self.documents >= 0).mean()) if len(self) else 0.0


def pack_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], block_size: int, pad_id: int
) -> PackedRows:
    """Rows holding every example (ids [n], trained [n] bool: token j is a target), each at most block_size + 1
    tokens long (the caller truncates or drops longer ones)."""
    capacity = block_size + 1
    lengths = [len(ids) for ids, _ in examples]
    if any(n > capacity or n == 0 for n in lengths):
        raise ValueError(f"examples must hold 1 to {capacity} tokens")
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    members: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the fullest row that fits is found by bisection
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            row, room = len(members), capacity
            members.append([])
        else:
            room, row = free.pop(k)
        members[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))

    tokens = np.full((len(members), capacity), pad_id, dtype=np.int32)
    documents = np.full((len(members), capacity), PADDING, dtype=np.int32)
    targets = np.zeros((len(members), capacity), dtype=bool)
    for row, indices in enumerate(members):
        start = 0
        for document, i in enumerate(sorted(indices)):  # file order within the row: easier to read
            ids, trained = examples[i]
            end = start + len(ids)
            tokens[row, start:end] = ids
            documents[row, start:end] = document
            targets[row, start:end] = trained
            targets[row, start] = False  # an example's first token is never predicted from the one before it
            start = end
    loss_mask = targets[:, 1:] & (documents[:, 1:] == documents[:, :-1]) & (documents[:, 1:] >= 0)
    return PackedRows(tokens, loss_mask, documents)


def row_order(rows: int, n: int, seed: int, step: int) -> np.ndarray:
    """The indices of the n rows of batch `step`: batch after batch, every row once per epoch, each epoch in
    its own order drawn from (seed, epoch) alone, so a resumed run draws what an uninterrupted one would."""
    if rows < 1:
        raise ValueError("no rows to sample")
    drawn = np.arange(step * n, (step + 1) * n, dtype=np.int64)
    epochs, positions = np.divmod(drawn, rows)
    order = np.empty(n, dtype=np.int64)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        order[at] = np.random.default_rng([seed, int(epoch)]).permutation(rows)[positions[at]]
    return order


def sample_rows(rows: PackedRows, n: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch `step` of n rows (row_order): tokens int64 [n, block + 1], loss_mask bool [n, block], documents
    int64 [n, block + 1], fresh arrays (torch.from_numpy takes them as they are)."""
    order = row_order(len(rows), n, seed, step)
    return (rows.tokens[order].astype(np.int64), rows.loss_mask[order],
            rows.documents[order].astype(np.int64))



def row_batches(rows: PackedRows, n: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every row once, in order, n at a time (the last batch may be smaller), as sample_rows gives them:
    for scoring a validation split whole."""
    for start in range(0, len(rows), n):
        part = slice(start, start + n)
        yield (rows.tokens[part].astype(np.int64), rows.loss_mask[part].copy(),
               rows.documents[part].astype(np.int64))


__all__ = ["PADDING", "PackedRows", "pack_examples", "row_batches", "row_order", "sample_rows"]
