"""Running generations for the server: N slots on one Generator, a bounded waiting line, and a bridge
from the worker thread that decodes to the event loop that answers HTTP.

    request ─► Slots.acquire ─┬─ a slot is free: run now
                              ├─ all busy, fewer than max_queue waiting: wait in line (first come, first served)
                              └─ all busy, the line full: 503 at once
    slot ─► worker thread: for piece in stream ─► loop.call_soon_threadsafe(queue.put) ─► async iterator
             the slot is released by the worker itself, when the decode loop has really ended, so a
             cancelled request frees its slot only once its thread stops using the CPU

Every slot runs its own sequence (its own sampler and stop rules; its own KV cache, or its row of the
continuous batcher's buffers: runtime/continuous.py) on the one loaded Generator, whose session is shared
and thread-safe (runtime/generator.py). A request that guesses ahead (a draft, lookup) is decoded by its
slot's own thread even where the others share a batch. Cancelling sets the stream's `cancel`
event, which the decode loop checks before every forward pass: a request whose client went away stops
within one decode step.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from edgegpt.server.protocol import APIError

_END = object()


class Slots:
    """`parallel` generations at a time and at most `max_queue` requests waiting for one."""

    def __init__(self, parallel: int, max_queue: int) -> None:
        self.parallel, self.max_queue = parallel, max_queue
        self.busy = 0
        self.waiting = 0
        self.served = 0
        self.cancelled = 0
        self._free = asyncio.Semaphore(parallel)
        self.executor = ThreadPoolExecutor(parallel, thread_name_prefix="edgegpt-slot")
        self.running: set[Generation] = set()

    async def acquire(self) -> None:
        if self._free.locked() and self.waiting >= self.max_queue:
            raise APIError(503, f"the server is busy: {self.parallel} generation(s) running and {self.waiting} "
                           "waiting; retry later", code="server_busy")
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
        self._free.release()

    def stats(self) -> dict:
        return {"slots": self.parallel, "busy": self.busy, "waiting": self.waiting, "max_queue": self.max_queue,
                "served": self.served, "cancelled": self.cancelled}

    def cancel_all(self) -> None:
        for generation in list(self.running):
            generation.cancel.set()


class Generation:
    """One request's decode loop on a worker thread, read as an async iterator of text pieces.

    make(cancel) builds the runtime Stream (checking options and the prompt: raise before any slot is
    taken); start() runs it in a slot; pieces() yields its text; finish_reason and the token counts are
    the Stream's once it has ended.
    """

    def __init__(self, stream, cancel: threading.Event) -> None:
        self.stream = stream
        self.cancel = cancel
        self.disconnected = False  # the client went away (nothing more can be sent to it)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    async def start(self, slots: Slots) -> None:
        await slots.acquire()
        slots.running.add(self)
        try:
            slots.executor.submit(self._work, slots)
        except BaseException:  # the executor is shut down (the server is stopping)
            slots.running.discard(self)
            slots.release()
            raise APIError(503, "the server is shutting down", code="server_shutting_down") from None

    def _work(self, slots: Slots) -> None:
        put = self._loop.call_soon_threadsafe
        try:
            for piece in self.stream:
                put(self._queue.put_nowait, piece)
            put(self._queue.put_nowait, _END)
        except BaseException as error:  # noqa: BLE001 - handed to the request's coroutine, which answers it
            put(self._queue.put_nowait, error)
        finally:
            put(self._finished, slots)

    def _finished(self, slots: Slots) -> None:
        slots.running.discard(self)
        slots.served += 1
        slots.cancelled += self.stream.finish_reason == "cancelled"
        slots.release()

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces as they come; cancels the generation if the consumer stops early."""
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self.stream.finish_reason is None:
                self.cancel.set()

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    async def watch_disconnect(self, receive) -> None:
        """Cancel when the client goes away (ASGI http.disconnect); run as a task beside the reply."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self.cancel.set()
                return
