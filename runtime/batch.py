"""Batched decoding on the fused graph: rows of different lengths, one decode call per step. The one batch
decoder: Generator.generate_batch runs its rows to the end (decode_rows), and the continuous batcher
(runtime/continuous.py) lets rows join and leave it between steps.

    buffers [rows, n_kv_heads, capacity, head_dim] per cache tensor (numpy, CPU)
      row b = buffer[b : b + 1] is C-contiguous: an OrtValue wraps it without a copy
      capacity: runtime/kv_cache.py's first capacity (or enough for the prompts at hand), doubled for all
                rows at once when a prompt or a step needs more, at most max_length (as one sequence's)
    prefill: one row at batch 1 into its own slice (onnxruntime's CPU GroupQueryAttention runs several new
             tokens only at batch 1 or on an empty past; row by row also keeps each row's prompt logits
             exactly those of a lone prefill), and its first token chosen
    step:    rows 0..k-1 (k = highest busy row + 1) decode together, input_ids [k, 1], seqlens_k[b] = row
             b's tokens − 1 (right padding: a row never reads past its own length); a free row below k
             feeds a dummy token at position 0 of its own slice, which nothing reads

The weights are read once per step for all rows, which is where a batch gains on a CPU. Each row keeps
its own Sampler and Decoding, the one-by-one stop rules (runtime/decoding.py), so a row's text equals
what `Generator.generate` gives for that prompt alone with the same options. Plain decoding only: a row
that guesses ahead (runtime/speculative.py) runs alone through the Generator instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgegpt.runtime.decoding import Decoding
from edgegpt.runtime.kv_cache import StaticRunner, grown, grown_capacity
from edgegpt.runtime.options import GenerationOptions
from edgegpt.runtime.sampling import Sampler


def batches(runner, provider: str) -> bool:
    """Whether a Generator with this runner and provider decodes rows together: the fused graph on the CPU."""
    return isinstance(runner, StaticRunner) and provider == "cpu"


class Row:
    """One sequence of a batch: its prompt, Sampler and Decoding, the tokens its slice of the cache holds
    and the token to feed next."""

    def __init__(self, prompt_ids: list[int], options: GenerationOptions, decoding: Decoding, vocab_size: int) -> None:
        self.prompt_ids = prompt_ids
        self.sampler = Sampler(options.sampling, options.seed, prompt_ids, vocab_size)
        self.decoding = decoding
        self.length = 0  # tokens in its slice of the cache
        self.next_token = 0
        self.pieces: list[str] = []

    def choose(self, logits: np.ndarray) -> None:
        """Choose the next token from logits [vocab], apply the stop rules, emit the text that became final."""
        self.next_token = self.sampler.choose(logits)
        self.decoding.accept([self.next_token])
        if piece := self.decoding.take_text():
            self.emit(piece)

    def emit(self, piece: str) -> None:
        """Text that became final: kept in `pieces` here; a continuous batcher's row sends it to its reader."""
        self.pieces.append(piece)

    def text(self) -> str:
        return "".join(self.pieces)


class BatchDecoder:
    """Up to `rows` Rows decoded together on a StaticRunner on the CPU. `capacity`: the positions the
    buffers start with (default: the runner's first capacity). `checked(logits)` refuses logits that are
    not finite (Generator._checked). One thread at a time."""

    def __init__(self, runner: StaticRunner, rows: int, checked: Callable[[np.ndarray], np.ndarray],
                 capacity: int | None = None) -> None:
        self.runner, self.checked = runner, checked
        self.capacity = runner.first_capacity() if capacity is None else capacity
        self.arrays = runner.new_arrays(rows, self.capacity)
        self.rows: list[Row | None] = [None] * rows  # None: a free row
        self._input_ids = np.zeros((rows, 1), np.int64)
        self._seqlens_k = np.zeros(rows, np.int32)
        self._total = np.zeros((), np.int32)
        self._logits = np.zeros((rows, 1, runner.package.model.vocab_size), np.float32)
        self._binding = None
        self._bound = (0, 0)  # (rows, capacity) the binding was made for

    @property
    def busy(self) -> int:
        return len(self.rows) - self.rows.count(None)

    def prefill(self, index: int, row: Row) -> None:
        """Run the row's prompt into free row `index` and choose its first token; the row is busy there
        from then on (unless this raises: then the row stays free)."""
        if len(row.prompt_ids) > self.capacity:
            self._grow(len(row.prompt_ids))
        arrays = {past: array[index : index + 1] for past, array in self.arrays.items()}
        logits, _ = self.runner.forward(row.prompt_ids, self.runner.new_cache(arrays=arrays))
        row.length = len(row.prompt_ids)
        row.choose(self.checked(logits[-1]))
        self.rows[index] = row

    def free(self, index: int) -> Row:
        """Row `index` leaves the batch (what its slice holds is never read again); returns it."""
        row, self.rows[index] = self.rows[index], None
        return row

    def step(self) -> list[int]:
        """Feed every busy row its next token in one decode call and choose the token after it; returns the
        indices of the rows that stepped. Rows whose Decoding is done must have been freed."""
        width = max(index for index, row in enumerate(self.rows) if row is not None) + 1
        for index in range(width):
            row = self.rows[index]
            if row is None:
                self._input_ids[index, 0], self._seqlens_k[index] = 0, 0
            else:
                row.length += 1
                self._input_ids[index, 0], self._seqlens_k[index] = row.next_token, row.length - 1
        self._total[...] = int(self._seqlens_k[:width].max()) + 1
        if self._total > self.capacity:
            self._grow(int(self._total))
        if self._bound != (width, self.capacity):
            self._bind(width)
        self.runner.session.run_with_iobinding(self._binding)
        stepped = [index for index in range(width) if self.rows[index] is not None]
        for index in stepped:
            self.rows[index].choose(self.checked(self._logits[index, -1]))
        return stepped

    def _grow(self, needed: int) -> None:
        larger = grown_capacity(self.capacity, needed, self.runner.max_length)
        # Every busy row keeps its tokens: copy all positions any of them holds (a step about to write one
        # more position than the buffers have counts it already).
        keep = min(self.capacity, max([row.length for row in self.rows if row is not None], default=0))
        # (a sliding layer's window-sized buffer never grows: runtime/kv_cache.py)
        self.arrays = {past: array if past in self.runner.sliding else grown(array, larger, keep)
                       for past, array in self.arrays.items()}
        self.capacity = larger

    def _bind(self, width: int) -> None:
        """A binding of the first `width` rows (prefix slices of C-contiguous arrays: no copies)."""
        import onnxruntime as ort

        binding = self.runner.session.io_binding()
        for name, array in (("input_ids", self._input_ids[:width]), ("seqlens_k", self._seqlens_k[:width]),
                            ("total_sequence_length", self._total)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits[:width]))
        self.runner.bind(binding, {past: array[:width] for past, array in self.arrays.items()})
        self._binding, self._bound = binding, (width, self.capacity)


def decode_rows(runner: StaticRunner, rows: Sequence[Row], checked: Callable[[np.ndarray], np.ndarray]) -> None:
    """Run `rows` to the end together, in place (each row's text: Row.text())."""
    # Enough positions for every prompt, so no row's prefill grows the buffers.
    decoder = BatchDecoder(runner, len(rows), checked, runner.first_capacity(max(len(r.prompt_ids) for r in rows)))
    for index, row in enumerate(rows):
        if not row.decoding.done:
            decoder.prefill(index, row)
    while True:
        for index, row in enumerate(decoder.rows):
            if row is not None and row.decoding.done:
                decoder.free(index)
        if not decoder.busy:
            return
        decoder.step()
