"""Continuous batching: sequences join and leave one running batch between decode steps, so requests that
arrive at different times still share each step's one read of the weights (the server's --parallel slots).

    stream(prompt) / stream_chat(messages) ─► Stream; at its first next() the sequence joins the queue
    one decode thread, forever, on one BatchDecoder (runtime/batch.py, shared with generate_batch):
        admit  a waiting sequence takes the lowest free row: its prompt is prefilled at batch 1 into that
               row's slice of the buffers, its first token chosen
        step   the busy rows decode together, one token each (BatchDecoder.step)
        leave  a row whose Decoding is done, cancelled (`cancel` set) or whose Stream was closed frees its
               row before the next step; its pieces went to its own queue as they were made

Each sequence keeps its own Sampler and Decoding (the one-by-one stop rules), so its text is what
Generator.stream gives for it alone, as in generate_batch. What batching gains through `edgegpt serve`
(`benchmarks/serve_load.py`): docs/benchmarks.md.
Only the fused graph on the CPU batches this way (Generator.generate_batch's condition); `supports` says.
A sequence that guesses ahead (a draft loaded, or lookup asked for, and `speculate` not False:
runtime/speculative.py) is not batched: its Stream decodes it on its own through the Generator, in the
thread that reads it, exactly as Generator.stream does.
"""

from __future__ import annotations

import queue
import threading
import typing
from collections import deque
from typing import TYPE_CHECKING, Sequence

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.batch import BatchDecoder, Row, batches
from edgegpt.runtime.decoding import Cancel, Decoding
from edgegpt.runtime.generator import Generator, Stream
from edgegpt.runtime.options import GenerationOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from edgegpt.runtime.options import GenerateOptions

_END = object()


class _Sequence(Row):
    """One request in the batch: a Row whose text goes to its reader's queue as it is made."""

    def __init__(self, prompt_ids: list[int], options: GenerationOptions, decoding: Decoding, vocab: int) -> None:
        super().__init__(prompt_ids, options, decoding, vocab)
        self.closed = False  # its Stream was closed by the consumer
        self.out: queue.SimpleQueue = queue.SimpleQueue()

    def emit(self, piece: str) -> None:
        self.out.put(piece)

    def ended(self) -> bool:
        return self.decoding.done or self.closed or self.decoding.cancelled()


def supports(generator: Generator) -> bool:
    """Whether this Generator's package can be batched (the fused graph, on the CPU)."""
    return batches(generator._runner, generator.provider)


class ContinuousBatcher:
    """Up to `rows` sequences decoded together on one Generator, joining and leaving between steps.

        batcher = ContinuousBatcher(generator, rows=4)
        stream = batcher.stream(prompt, cancel=event, **options)   # as Generator.stream, from any thread
        stream = batcher.stream_chat(messages, **options)          # as Generator.stream_chat

    More sequences than rows wait (first come, first served) until a row is free. close() ends the
    decode thread; sequences still running in it end with an EdgeGPTError. A sequence that guesses ahead
    takes no row: it decodes on its own (module doc), and close() leaves it be.
    """

    def __init__(self, generator: Generator, rows: int) -> None:
        if not supports(generator):
            layout = generator.package.graph.kv_layout
            raise EdgeGPTError(f"continuous batching needs a fused package on the CPU; {generator.package.path} "
                               f"is {layout} on {generator.provider}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise EdgeGPTError(f"rows must be a positive integer, got {rows!r}")
        self.generator, self.rows = generator, rows
        self._decoder = BatchDecoder(generator._runner, rows, generator._checked)
        self.peak = 0  # the most sequences decoded in one step so far
        self._waiting: deque[_Sequence] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edgegpt-batch", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------------------

    def stream(self, prompt: str | Sequence[int], *, cancel: Cancel | None = None,
               **options: Unpack[GenerateOptions]) -> Stream[str]:
        """As Generator.stream: options and the prompt are checked now, decoding starts at the first next().
        A sequence that guesses ahead is decoded on its own (module doc)."""
        resolved = self.generator._resolve(options)
        return self._stream(self.generator._prompts.prompt_ids(prompt, resolved), resolved, cancel)

    def stream_chat(self, messages: Sequence[dict[str, str]], *, cancel: Cancel | None = None,
                    **options: Unpack[GenerateOptions]) -> Stream[str]:
        """As Generator.stream_chat (and, guessing ahead, decoded on its own as `stream`)."""
        resolved = self.generator._resolve(options)
        return self._stream(self.generator._prompts.chat_ids(messages, resolved), resolved, cancel)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _stream(self, prompt_ids: list[int], options: GenerationOptions, cancel: Cancel | None) -> Stream[str]:
        if self.generator._speculation(options) is not None:  # no silent plain decoding: speculate alone
            return self.generator._text_stream(prompt_ids, options, cancel)
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
                while not self._closed and not self._waiting and not self._decoder.busy:
                    self._wake.wait()
                if self._closed:
                    break
                joining = []
                while self._waiting and len(joining) < self._decoder.rows.count(None):
                    joining.append(self._waiting.popleft())
            try:
                for sequence in joining:
                    self._admit(sequence)
                for index, sequence in enumerate(self._decoder.rows):
                    if sequence is not None and sequence.ended():
                        self._leave(index)
                if self._decoder.busy:
                    self._step()
            except BaseException as error:  # noqa: BLE001 - a failed step: every sequence in it gets the error
                for index, sequence in enumerate(self._decoder.rows):
                    if sequence is not None:
                        self._decoder.free(index).out.put(error)
        closed = EdgeGPTError("the batcher was closed while this generation ran")
        for sequence in [*self._waiting, *filter(None, self._decoder.rows)]:
            sequence.out.put(closed)

    def _admit(self, sequence: _Sequence) -> None:
        decoding = sequence.decoding
        if decoding.done or sequence.closed or decoding.cancelled():
            sequence.out.put(_END)
            return
        index = self._decoder.rows.index(None)
        try:
            self._decoder.prefill(index, sequence)
        except BaseException as error:  # noqa: BLE001 - this sequence's failure, not the batch's
            sequence.out.put(error)
            return
        if decoding.done:
            self._leave(index)

    def _leave(self, index: int) -> None:
        sequence = self._decoder.free(index)
        if tail := sequence.decoding.take_text():
            sequence.out.put(tail)
        sequence.out.put(_END)

    def _step(self) -> None:
        stepped = self._decoder.step()
        self.peak = max(self.peak, len(stepped))
        for index in stepped:
            if self._decoder.rows[index].decoding.done:
                self._leave(index)
