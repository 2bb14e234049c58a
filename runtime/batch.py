"""Batched generation on the fused graph: several prompts of different lengths, one decode call per step.

    buffer [B, n_kv_heads, capacity, head_dim] per cache tensor (numpy, CPU)
      row b = buffer[b : b + 1] is C-contiguous: an OrtValue wraps it without a copy
      capacity: enough for the longest prompt (runtime/kv_cache.py's first capacity), doubled for all
                rows at once when the longest row needs more, at most max_length (as one sequence's)
    prefill: row by row at batch 1, each into its own slice (onnxruntime's CPU GroupQueryAttention runs
             several new tokens only at batch 1 or on an empty past; row by row also keeps each row's
             prompt logits exactly those of a lone prefill)
    decode:  all rows at once, input_ids [B, 1], seqlens_k[b] = row b's tokens − 1 (right padding:
             a row never reads past its own length); a finished row is frozen: it feeds a dummy token
             over its own last position, which nothing reads again, and its logits are ignored

The weights are read once per step for all rows, which is where a batch gains on a CPU. Each row keeps
its own Sampler and Decoding, the one-by-one stop rules (runtime/decoding.py), so a row's
text equals what `Generator.generate` gives for that prompt alone with the same options.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgegpt.runtime.decoding import Decoding
from edgegpt.runtime.kv_cache import grown, grown_capacity
from edgegpt.runtime.options import GenerationOptions
from edgegpt.runtime.sampling import Sampler


class Row:
    """One sequence of the batch: its sampler and its Decoding (the one-by-one stop rules and text)."""

    def __init__(self, prompt_ids: list[int], options: GenerationOptions, decoding: Decoding, vocab_size: int) -> None:
        self.sampler = Sampler(options.sampling, options.seed, prompt_ids, vocab_size)
        self.decoding = decoding
        self.length = len(prompt_ids)  # tokens in the cache
        self.pieces: list[str] = []

    @property
    def done(self) -> bool:
        return self.decoding.done

    def accept(self, logits: np.ndarray) -> int | None:
        """Choose the next token from logits [vocab]; return it if it must be fed, None once finished."""
        token = self.sampler.choose(logits)
        self.decoding.accept([token])
        self.pieces.append(self.decoding.take_text())
        return None if self.decoding.done else token

    def result(self) -> str:
        return "".join(self.pieces)


def generate_rows(runner, rows: Sequence[Row], prompts: Sequence[list[int]], checked: Callable) -> None:
    """Run `rows` (their prompts `prompts`) to the end on a StaticRunner on the CPU, in place."""
    import onnxruntime as ort

    B, vocab = len(rows), runner.package.model.vocab_size
    # Every row's prompt fits, so a row's prefill never grows (and so never leaves) the shared buffer.
    capacity = runner.first_capacity(max(len(ids) for ids in prompts))
    arrays = {past: np.zeros(runner.buffer_shape(B, capacity), runner.dtype) for past, _ in runner.layer_names}
    feed: list[int | None] = []
    for b, (row, ids) in enumerate(zip(rows, prompts)):
        if row.done:
            feed.append(None)
            continue
        cache = runner.new_cache(arrays={name: array[b : b + 1] for name, array in arrays.items()})
        logits, _ = runner.forward(ids, cache)
        feed.append(row.accept(checked(logits[-1])))

    input_ids = np.zeros((B, 1), np.int64)
    seqlens_k = np.zeros(B, np.int32)
    total = np.zeros((), np.int32)
    logits = np.zeros((B, 1, vocab), np.float32)
    binding = runner.session.io_binding()
    for name, array in (("input_ids", input_ids), ("seqlens_k", seqlens_k), ("total_sequence_length", total)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    runner.bind(binding, arrays)

    while any(token is not None for token in feed):
        for b, (row, token) in enumerate(zip(rows, feed)):
            if token is not None:
                row.length += 1
            input_ids[b, 0] = 0 if token is None else token
            seqlens_k[b] = max(row.length, 1) - 1
        total[...] = max(row.length for row in rows)
        if total > capacity:
            larger = grown_capacity(capacity, int(total), runner.max_length)
            arrays = {name: grown(array, larger, capacity) for name, array in arrays.items()}
            runner.bind(binding, arrays)
            capacity = larger
        runner.session.run_with_iobinding(binding)
        feed = [None if token is None else row.accept(checked(logits[b, -1])) for b, (row, token) in
                enumerate(zip(rows, feed))]

