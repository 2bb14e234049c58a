"""Fine-tuning examples from JSONL files: chat conversations and prompt/completion pairs, tokenized the way
the checkpoint's model reads them, with the tokens to train on marked, packed into rows (train/packing.py).

The API the training loop calls::

    fmt = ExampleFormat.from_checkpoint(directory)  # its tokenizer, chat template, bos and eos tokens
    data = load_examples(paths, fmt, block_size, val_path=None, val_fraction=0.1, seed=0,
                         include_prompts=False, drop_long=False)
    data.train, data.val   PackedRows (tokens int32 [rows, block + 1], loss_mask bool [rows, block],
                           documents int32 [rows, block + 1]: the example within the row, -1 padding)
    data.summary           ExampleSummary; .describe() is one line to print
    tokens, loss_mask, documents = sample_rows(data.train, n, seed, step)   # numpy, int64 / bool / int64
        rows drawn from (seed, step) alone: every row once per epoch, each epoch in its own seeded order
    for tokens, loss_mask, documents in row_batches(data.val, n): ...   # every row once, in order
    model(tokens[:, :-1], documents=documents[:, :-1]) -> logits; the loss counts labels tokens[:, 1:]
        where loss_mask is true (padding and an example's first token never are)
    is_example_data(paths) -> bool   # JSONL of messages or prompt/completion records (else: plain text)

Records, one JSON object a line (blank lines skipped), either kind in any file:

    {"messages": [{"role": "system" | "user" | "assistant" | ..., "content": "..."}, ...]}
        The OpenAI / Hugging Face chat format, rendered by the checkpoint's chat template exactly as the
        runtime renders a chat (runtime/chat_template.py) and encoded without adding special tokens (the
        template writes bos and the turn markers; so bos is never doubled). Trained: each assistant
        message's tokens after the template's header of the assistant's turn, through its end-of-turn
        marker (<|im_end|>, <|eot_id|>, <end_of_turn>: the model learns to stop), not the whitespace the
        template writes after it (the model never writes that). An assistant message with "weight": 0
        (OpenAI's fine-tuning format) is context, not trained.
    {"prompt": "...", "completion": "..."}
        Raw text, as TRL treats a plain prompt/completion pair (even for a checkpoint with a chat template:
        to train the chat format, write messages): the tokenizer's own start (bos where its encoder adds
        one; a model trained here: <|endoftext|>, as each training document starts), the prompt, the
        completion, then the end-of-text token the runtime stops at. Prompt and completion are tokenized
        apart, as the runtime tokenizes a prompt; put the separator (a space, a newline) in either. Trained:
        the completion and the end-of-text token.

include_prompts trains every token instead (but an example's first, which nothing predicts).

Reading and tokenizing the records (and how the assistant's tokens are found): train/records.py.
Packing and sampling: train/packing.py.

Examples longer than a row (block_size + 1 tokens) are cut to fit (truncated) or, with drop_long, left out
(dropped); an example left with nothing to train on after the cut is dropped too. Every bad record is one
EdgeGPTError naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.train.packing import PackedRows, pack_examples, row_batches, sample_rows
from edgegpt.train.records import Example, ExampleFormat, is_example_data, read_examples


@dataclass
class ExampleSummary:
    """What load_examples made, for the loop to print (describe()). truncated: cut to a row's length;
    dropped: longer than a row with drop_long, or left with no trained token after the cut (both counted over
    the training and validation examples)."""

    examples: int  # training examples packed
    val_examples: int
    tokens: int  # training tokens in the rows
    trained_tokens: int  # training labels the loss counts
    rows: int
    val_rows: int
    block_size: int
    efficiency: float  # the fraction of the training rows' tokens that are examples' (the rest is padding)
    truncated: int
    dropped: int

    def describe(self) -> str:
        cut = f"{self.truncated:,} truncated, {self.dropped:,} dropped (longer than {self.block_size + 1} tokens)"
        return (f"{self.examples:,} examples ({self.tokens:,} tokens, {self.trained_tokens:,} trained) in "
                f"{self.rows:,} rows of {self.block_size + 1} tokens, {self.efficiency:.0%} full; "
                f"{self.val_examples:,} validation examples in {self.val_rows:,} rows; {cut}")


@dataclass
class ExampleData:
    train: PackedRows
    val: PackedRows
    summary: ExampleSummary


def load_examples(
    paths: Sequence[Path],
    fmt: ExampleFormat,
    block_size: int,
    *,
    val_path: Path | Sequence[Path] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    include_prompts: bool = False,
    drop_long: bool = False,
) -> ExampleData:
    """Training and validation rows of the examples in `paths` (files, or directories of .jsonl files).
    Validation: the examples of val_path (a file, a directory or a list of them), else a seeded val_fraction of
    the examples (at least one, and at least one left to train on)."""
    train = read_examples(paths, fmt, include_prompts)
    val_paths = [val_path] if isinstance(val_path, (str, Path)) else list(val_path or [])
    if val_paths:
        val = read_examples(val_paths, fmt, include_prompts)
    else:
        if len(train) < 2:
            raise EdgeGPTError(f"the data holds {len(train)} example; validation needs one more, or a "
                               "validation file of its own")
        count = min(len(train) - 1, max(1, round(val_fraction * len(train))))
        chosen = set(np.random.default_rng(seed).permutation(len(train))[:count].tolist())
        train, val = ([e for i, e in enumerate(train) if (i in chosen) == held] for held in (False, True))
    counts = {"truncated": 0, "dropped": 0}
    train, val = _fit(train, block_size, drop_long, counts), _fit(val, block_size, drop_long, counts)
    for split, kept in (("training", train), ("validation", val)):
        if not kept:
            raise EdgeGPTError(f"no {split} example fits: every one is longer than {block_size + 1} tokens or has "
                               "nothing left to train on when cut; raise --block-size or shorten the examples")
    pad = int(fmt.eos_id)
    train_rows, val_rows = pack_examples(train, block_size, pad), pack_examples(val, block_size, pad)
    summary = ExampleSummary(
        examples=len(train), val_examples=len(val), tokens=sum(len(ids) for ids, _ in train),
        trained_tokens=train_rows.trained_tokens, rows=len(train_rows), val_rows=len(val_rows),
        block_size=block_size, efficiency=train_rows.filled, **counts,
    )
    return ExampleData(train_rows, val_rows, summary)


def _fit(examples: list[Example], block_size: int, drop_long: bool, counts: dict[str, int]) -> list[Example]:
    """The examples cut (or, with drop_long, left out) to fit a row; those with no target left are dropped."""
    capacity, kept = block_size + 1, []
    for ids, trained in examples:
        cut = len(ids) > capacity
        if cut and not drop_long:
            ids, trained = ids[:capacity], trained[:capacity]
        if (cut and drop_long) or not trained[1:].any():  # (the first token is never a target)
            counts["dropped"] += 1
            continue
        counts["truncated"] += cut
        kept.append((ids, trained))
    return kept


__all__ = [
    "ExampleData", "ExampleFormat", "ExampleSummary", "PackedRows", "is_example_data", "load_examples",
    "read_examples", "row_batches", "sample_rows",
]
