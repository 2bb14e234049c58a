"""What a training step reads, from either kind of data, and how the loss is weighed across micro-batches and ranks.

    plain text   TokenData (train/data.py)     random windows of the token stream; every label counts (with a
                                               package teacher, windows of a fixed grid: data.sample_grid)
    JSONL        Examples (train/examples.py)  packed rows of chat or prompt/completion examples; the labels
                                               the loss mask leaves out are IGNORE, and the model reads the
                                               rows' documents so no example attends to another

Both are drawn from (seed, step) alone, so a resumed run reads what the interrupted one would have.

The loss of a step is the mean over every counted label of the global batch. With a loss mask, micro-batches
and ranks count different numbers of labels, so each micro-batch's mean is weighed by its share of the global
count (Batch.weight): the mean of per-micro-batch means would favour rows with few trained tokens, and two
processes would not train what one does with the same global batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT
from edgegpt.scoring import Score
from edgegpt.train import distributed
from edgegpt.train.data import TokenData, grid_batch, grid_windows, sample_batch, sample_grid
from edgegpt.train.examples import (
    ExampleFormat,
    ExampleSummary,
    PackedRows,
    is_example_data,
    load_examples,
    row_batches,
    sample_rows,
)
from edgegpt.train.options import TrainOptions

IGNORE = -100  # a label the loss leaves out (cross_entropy's ignore_index)


@dataclass
class Examples:
    """JSONL examples packed into rows, with what the loop needs beside them (as TokenData has it)."""

    tokenizer: Tokenizer
    train: PackedRows
    val: PackedRows
    summary: ExampleSummary
    key: str  # identifies the rows; recorded in train_state.json, so a resume reads the same examples

    @property
    def train_tokens(self) -> int:
        return self.summary.tokens

    @property
    def val_tokens(self) -> int:
        return int((self.val.documents >= 0).sum())


def load_example_rows(data: list[Path], val_data: list[Path], fmt: ExampleFormat, block_size: int, seed: int,
                      include_prompts: bool, drop_long: bool) -> Examples:
    loaded = load_examples(data, fmt, block_size, val_path=val_data or None, seed=seed,
                           include_prompts=include_prompts, drop_long=drop_long)
    digest = hashlib.sha256(b"edgegpt-examples-1")
    for rows in (loaded.train, loaded.val):
        for array in (rows.tokens, rows.loss_mask, rows.documents):
            digest.update(np.ascontiguousarray(array).tobytes())
    return Examples(fmt.tokenizer, loaded.train, loaded.val, loaded.summary, digest.hexdigest()[:16])


def check_example_data(data: list[Path], opts: TrainOptions, resume: bool) -> bool:
    """Whether --data is JSONL examples, refusing what cannot train on them: a tokenizer still to be trained, a
    teacher (its forward pass does not separate packed examples), the example options on plain text."""
    examples = bool(data) and is_example_data(data)
    if examples and opts.teacher is not None:
        raise EdgeGPTError("--teacher distils on plain text; JSONL examples (messages, prompt/completion) train "
                           "with labels only: drop --teacher")
    if examples and not (resume or opts.from_checkpoint or opts.tokenizer):
        raise EdgeGPTError("JSONL examples (messages, prompt/completion) need the model's tokenizer: fine-tune a "
                           "checkpoint with --from, or give --tokenizer")
    if not examples and (opts.include_prompts or opts.drop_long):
        raise EdgeGPTError("--include-prompts and --drop-long apply to JSONL examples (messages or "
                           "prompt/completion records); this data is plain text")
    return examples


@dataclass
class Batch:
    """Rows of block_size + 1 tokens; for examples, which labels count and the example each token belongs to."""

    tokens: Tensor  # int64 [rows, block + 1]
    loss_mask: Tensor | None = None  # bool [rows, block]; None: every label counts
    documents: Tensor | None = None  # int64 [rows, block + 1]; None: one document per row
    windows: Tensor | None = None  # int64 [rows]: each row's window of the fixed grid (data.sample_grid); None: random

    @property
    def inputs(self) -> Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> Tensor:
        labels = self.tokens[:, 1:]
        return labels if self.loss_mask is None else labels.masked_fill(~self.loss_mask, IGNORE)

    @property
    def counted_labels(self) -> Tensor:
        """The labels the loss counts, as CountedLogits(counted=loss_mask) orders its logits: [rows, block] for
        plain text, [counted] for examples."""
        labels = self.tokens[:, 1:]
        return labels if self.loss_mask is None else labels[self.loss_mask]

    @property
    def input_documents(self) -> Tensor | None:
        return None if self.documents is None else self.documents[:, :-1]

    @property
    def counted(self) -> int:
        """Labels the loss counts."""
        return self.inputs.numel() if self.loss_mask is None else int(self.loss_mask.sum())

    def _map(self, change) -> Batch:
        return Batch(*(None if t is None else change(t)
                       for t in (self.tokens, self.loss_mask, self.documents, self.windows)))

    def of_rank(self, world: distributed.World) -> Batch:
        return self._map(lambda t: distributed.rank_rows(t, world))

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device))

    def chunk(self, parts: int) -> list[Batch]:
        rows = self.tokens.shape[0]
        size = -(-rows // parts)
        return [self._map(lambda t, start=start: t[start:start + size]) for start in range(0, rows, size)]

    def weight(self, counted_per_rank: float) -> float:
        """This micro-batch's share of its rank's loss: its labels over the global batch's, times the ranks
        (DistributedDataParallel averages the ranks' gradients)."""
        return self.counted / counted_per_rank


def draw_batch(data: TokenData | Examples, rows: int, block_size: int, seed: int, step: int,
               fixed_windows: bool = False) -> Batch:
    """The global batch of `step`: every rank draws the same and trains on its share of the rows. fixed_windows:
    plain text's windows come from the fixed grid (a package teacher's cache is kept per window of it)."""
    if isinstance(data, Examples):
        tokens, loss_mask, documents = sample_rows(data.train, rows, seed, step)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(loss_mask), torch.from_numpy(documents))
    if fixed_windows:
        windows = sample_grid(grid_windows(len(data.train), block_size), rows, seed, step)
        return Batch(torch.from_numpy(grid_batch(data.train, windows, block_size)), windows=torch.from_numpy(windows))
    return Batch(torch.from_numpy(sample_batch(data.train, rows, block_size, seed, step)))


class CountedLogits(nn.Module):
    """The model as a training step calls it: the logits at the labels the loss counts (counted [B, T] bool; None:
    every position). The LM head runs on those positions alone: its vocabulary-wide rows are the largest tensors
    of a step, and on chat data most positions are prompts the loss leaves out."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, documents: Tensor | None = None, counted: Tensor | None = None) -> Tensor:
        hidden = self.model.hidden_states(input_ids, documents)
        return self.model.logits(hidden if counted is None else hidden[counted])


@torch.no_grad()
def evaluate_rows(model: GPT, rows: PackedRows, char_table: np.ndarray, n_rows: int, device: torch.device,
                  batch_size: int = 8) -> Score:
    """Validation of packed examples: nats over the labels the loss counts, in up to n_rows rows spread evenly
    over the split (the same rows every time, so the losses compare)."""
    was_training = model.training
    model.eval()
    if len(rows) > n_rows:
        picked = np.unique(np.linspace(0, len(rows) - 1, n_rows).round().astype(np.int64))
        rows = PackedRows(rows.tokens[picked], rows.loss_mask[picked], rows.documents[picked])
    nats, counted, chars, top1 = 0.0, 0, 0, []
    try:
        for tokens, loss_mask, documents in row_batches(rows, batch_size):
            batch = Batch(torch.from_numpy(tokens), torch.from_numpy(loss_mask), torch.from_numpy(documents)).to(device)
            kept = batch.loss_mask
            # The LM head on the counted positions alone: a vocabulary-wide row per position is the largest thing.
            logits = model.logits(model.hidden_states(batch.inputs, batch.input_documents)[kept]).float()
            nats += F.cross_entropy(logits, batch.tokens[:, 1:][kept], reduction="sum").item()
            counted += int(kept.sum())
            chars += int(char_table[tokens[:, 1:][loss_mask]].sum())
            top1.append(logits.argmax(-1).cpu().numpy())
    finally:
        model.train(was_training)
    if counted == 0:
        raise EdgeGPTError("the validation examples have no token to score; give --val-data with assistant turns")
    return Score(nats, counted, chars, np.concatenate(top1))
