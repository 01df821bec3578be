"""A small dynamic batcher: requests that arrive together share one model call, off the event loop.

``await batcher.submit(item)`` queues the item and waits; a worker thread takes the first item waiting, then
every item already queued and any that arrive within ``max_wait`` seconds, up to ``max_batch``, and calls
``fn(items) -> results`` once for all of them. Under load the queue refills while a batch runs, so batches
grow with the number of concurrent requests and throughput with them; alone, a request waits at most
``max_wait``. ``max_batch=1`` turns batching off (one call per request), which bench/serving.py compares.

``fn`` may return an exception in place of a result: that request alone fails with it. An exception
raised by ``fn`` fails the whole batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

_STOP = object()


class Batcher:
    def __init__(self, name: str, fn: Callable[[list], Sequence], max_batch: int = 32, max_wait: float = 0.002,
                 on_batch: Callable[[str, int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.name, self.fn, self.max_batch, self.max_wait = name, fn, max_batch, max_wait
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"vlpt-batcher-{name}", daemon=True)
        self._thread.start()

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((item, future, loop))
        return await future

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread
    def _collect(self) -> tuple[list, bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    entry = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if entry is _STOP:
                stop = True
                break
            batch.append(entry)
        return batch, stop

    def _run(self) -> None:
        while True:
            batch, stop = self._collect()
            live = [entry for entry in batch if not entry[1].done()]  # a timed-out request was cancelled
            if live:
                self._call(live)
            if stop:
                return

    def _call(self, batch: list) -> None:
        items = [item for item, _, _ in batch]
        try:
            results = list(self.fn(items))
            if len(results) != len(items):
                raise RuntimeError(f"batcher {self.name}: {len(results)} results for {len(items)} items")
        except Exception as err:  # noqa: BLE001 - handed to every waiting request
            log.exception("batcher %s: a batch of %d failed", self.name, len(items))
            results = [err] * len(items)
        if self.on_batch is not None:
            self.on_batch(self.name, len(items))
        for (_, future, loop), result in zip(batch, results):
            loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # cancelled meanwhile (the request timed out)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
