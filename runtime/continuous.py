"""Continuous batching: sequences join and leave one running batch between decode steps, so requests that
arrive at different times still share each step's one read of the weights (the server's --parallel slots).

    stream(prompt) / stream_chat(messages) ─► Stream; at its first next() the sequence joins the queue
    one decode thread, forever:
        admit  a waiting sequence takes the lowest free row: its prompt is prefilled at batch 1 into that
               row's slice of the buffers (as runtime/batch.py does), its first token chosen
        step   rows 0..k-1 (k = highest busy row + 1) decode together, one token each; a free row below k
               feeds a dummy token at position 0 of its own slice, which nothing reads
        leave  a row whose Decoding is done, cancelled (`cancel` set) or whose Stream was closed frees its
               row before the next step; its pieces went to its own queue as they were made
    buffers [rows, n_kv_heads, capacity, head_dim] per cache tensor, grown by doubling for every row when a
    prompt or a step needs more (at most max_length)

Each sequence keeps its own Sampler and Decoding (the one-by-one stop rules), so its text is what
Generator.stream gives for it alone, as in generate_batch. Measured through `edgegpt serve` on SmolLM2-135M
int8 (2 cores, `benchmarks/serve_load.py`): 4 clients got 300 tokens/s in all from 4 batched slots, 149
from one slot.
Only the fused graph on the CPU batches this way (Generator.generate_batch's condition); `supports` says.
"""

from __future__ import annotations

import queue
import threading
import typing
from collections import deque
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.decoding import Cancel, Decoding
from edgegpt.runtime.generator import Generator, Stream
from edgegpt.runtime.kv_cache import StaticRunner, grown, grown_capacity
from edgegpt.runtime.options import GenerationOptions
from edgegpt.runtime.sampling import Sampler

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from edgegpt.runtime.options import GenerateOptions

_END = object()


class _Sequence:
    """One request in the batch: its sampler, stop rules, the token to feed next and its output queue."""

    def __init__(self, prompt_ids: list[int], options: GenerationOptions, decoding: Decoding, vocab: int) -> None:
        self.prompt_ids = prompt_ids
        self.sampler = Sampler(options.sampling, options.seed, prompt_ids, vocab)
        self.decoding = decoding
        self.length = len(prompt_ids)  # tokens in its row of the cache
        self.next_token = 0
        self.closed = False  # its Stream was closed by the consumer
        self.out: queue.SimpleQueue = queue.SimpleQueue()

    def choose(self, logits: np.ndarray) -> None:
        """Choose, apply the stop rules and send the text that became final."""
        self.next_token = self.sampler.choose(logits)
        self.decoding.accept([self.next_token])
        if piece := self.decoding.take_text():
            self.out.put(piece)

    def ended(self) -> bool:
        return self.decoding.done or self.closed or self.decoding.cancelled()


def supports(generator: Generator) -> bool:
    """Whether this Generator's package can be batched (the fused graph, on the CPU)."""
    return isinstance(generator._runner, StaticRunner) and generator.provider == "cpu"


class ContinuousBatcher:
    """Up to `rows` sequences decoded together on one Generator, joining and leaving between steps.

        batcher = ContinuousBatcher(generator, rows=4)
        stream = batcher.stream(prompt, cancel=event, **options)   # as Generator.stream, from any thread
        stream = batcher.stream_chat(messages, **options)          # as Generator.stream_chat

    More sequences than rows wait (first come, first served) until a row is free. close() ends the
    decode thread; sequences still running end with an EdgeGPTError.
    """

    def __init__(self, generator: Generator, rows: int) -> None:
        if not supports(generator):
            layout = generator.package.graph.kv_layout
            raise EdgeGPTError(f"continuous batching needs a fused package on the CPU; {generator.package.path} "
                               f"is {layout} on {generator.provider}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise EdgeGPTError(f"rows must be a positive integer, got {rows!r}")
        self.generator, self.rows = generator, rows
        self._runner: StaticRunner = generator._runner
        self._capacity = self._runner.first_capacity()
        self._arrays = {past: np.zeros(self._runner.buffer_shape(rows, self._capacity), self._runner.dtype)
                        for past, _ in self._runner.layer_names}
        vocab = generator.package.model.vocab_size
        self._input_ids = np.zeros((rows, 1), np.int64)
        self._seqlens_k = np.zeros(rows, np.int32)
        self._total = np.zeros((), np.int32)
        self._logits = np.zeros((rows, 1, vocab), np.float32)
        self._binding = None
        self._bound = (0, 0)  # (rows, capacity) the binding was made for
        self._busy: list[_Sequence | None] = [None] * rows
        self.peak = 0  # the most sequences decoded in one step so far
        self._waiting: deque[_Sequence] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edgegpt-batch", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------------------

    def stream(self, prompt: str | Sequence[int], *, cancel: Cancel | None = None,
               **options: Unpack[GenerateOptions]) -> Stream[str]:
        """As Generator.stream: options and the prompt are checked now, decoding starts at the first next()."""
        resolved = self.generator._resolve(options)
        return self._stream(self.generator._prompts.prompt_ids(prompt, resolved), resolved, cancel)

    def stream_chat(self, messages: Sequence[dict[str, str]], *, cancel: Cancel | None = None,
                    **options: Unpack[GenerateOptions]) -> Stream[str]:
        """As Generator.stream_chat."""
        resolved = self.generator._resolve(options)
        return self._stream(self.generator._prompts.chat_ids(messages, resolved), resolved, cancel)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _stream(self, prompt_ids: list[int], options: GenerationOptions, cancel: Cancel | None) -> Stream[str]:
        decoding = self.generator._decoding(prompt_ids, options, cancel, text=True)
        sequence = _Sequence(prompt_ids, options, decoding, self.generator._vocab_size)
        return Stream(self._pieces(sequence), len(prompt_ids), decoding)

    def _pieces(self, sequence: _Sequence) -> typing.Generator[str, None, str]:
        with self._wake:
            if self._closed:
                raise EdgeGPTError("this batcher is closed")
            self._waiting.append(sequence)
            self._wake.notify()
        try:
            while True:
                item = sequence.out.get()
                if item is _END:
                    return sequence.decoding.finish_reason
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            sequence.closed = True  # ended or abandoned: the decode thread drops it before its next step

    # -- the decode thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not any(self._busy):
                    self._wake.wait()
                if self._closed:
                    break
                joining = []
                while self._waiting and len(joining) < self._busy.count(None):
                    joining.append(self._waiting.popleft())
            try:
                for sequence in joining:
                    self._admit(sequence)
                for row, sequence in enumerate(self._busy):
                    if sequence is not None and sequence.ended():
                        self._leave(row)
                if any(self._busy):
                    self._step()
            except BaseException as error:  # noqa: BLE001 - a failed step: every sequence in it gets the error
                for row, sequence in enumerate(self._busy):
                    if sequence is not None:
                        sequence.out.put(error)
                        self._busy[row] = None
        closed = EdgeGPTError("the batcher was closed while this generation ran")
        for sequence in [*self._waiting, *filter(None, self._busy)]:
            sequence.out.put(closed)

    def _admit(self, sequence: _Sequence) -> None:
        decoding = sequence.decoding
        if decoding.done or sequence.closed or decoding.cancelled():
            sequence.out.put(_END)
            return
        row = self._busy.index(None)
        try:
            if len(sequence.prompt_ids) > self._capacity:
                self._grow(len(sequence.prompt_ids))
            arrays = {past: array[row : row + 1] for past, array in self._arrays.items()}
            logits, _ = self._runner.forward(sequence.prompt_ids, self._runner.new_cache(arrays=arrays))
            sequence.choose(self.generator._checked(logits[-1]))
        except BaseException as error:  # noqa: BLE001 - this sequence's failure, not the batch's
            sequence.out.put(error)
            return
        sequence.length = len(sequence.prompt_ids)
        self._busy[row] = sequence
        if decoding.done:
            self._leave(row)

    def _leave(self, row: int) -> None:
        sequence = self._busy[row]
        self._busy[row] = None
        if tail := sequence.decoding.take_text():
            sequence.out.put(tail)
        sequence.out.put(_END)

    def _step(self) -> None:
        rows = max(row for row, sequence in enumerate(self._busy) if sequence is not None) + 1
        for row in range(rows):
            sequence = self._busy[row]
            if sequence is None:
                self._input_ids[row, 0], self._seqlens_k[row] = 0, 0
            else:
                sequence.length += 1
                self._input_ids[row, 0], self._seqlens_k[row] = sequence.next_token, sequence.length - 1
        self._total[...] = int(self._seqlens_k[:rows].max()) + 1
        if self._total > self._capacity:
            self._grow(int(self._total))
        if self._bound != (rows, self._capacity):
            self._bind(rows)
        self._runner.session.run_with_iobinding(self._binding)
        self.peak = max(self.peak, len(self._busy) - self._busy.count(None))
        for row in range(rows):
            sequence = self._busy[row]
            if sequence is not None:
                sequence.choose(self.generator._checked(self._logits[row, -1]))
                if sequence.decoding.done:
                    self._leave(row)

    def _grow(self, needed: int) -> None:
        larger = grown_capacity(self._capacity, needed, self.generator.max_length)
        # Every busy row keeps its tokens: copy all positions any of them holds (a step about to write one
        # more position than the buffers have counts it already).
        keep = min(self._capacity, max([s.length for s in self._busy if s is not None], default=0))
        self._arrays = {past: grown(array, larger, keep) for past, array in self._arrays.items()}
        self._capacity = larger

    def _bind(self, rows: int) -> None:
        """A binding of the first `rows` rows (prefix slices of C-contiguous arrays: no copies)."""
        import onnxruntime as ort

        binding = self._runner.session.io_binding()
        for name, array in (("input_ids", self._input_ids[:rows]), ("seqlens_k", self._seqlens_k[:rows]),
                            ("total_sequence_length", self._total)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits[:rows]))
        self._runner.bind(binding, {past: array[:rows] for past, array in self._arrays.items()})
        self._binding, self._bound = binding, (rows, self._capacity)
