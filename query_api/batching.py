"""Dynamic micro-batching: concurrent queries share one forward pass.

Requests hand their preprocessed tensor to ``MicroBatcher.embed`` and await the vector.
One dedicated thread runs the forward passes, so the event loop never blocks on the
model. That thread takes the first waiting query, then gathers more until the batch is
full or the first query has waited ``max_wait_s``; it stops waiting early when no other
query is on its way (``expect``/``withdraw`` track queries still being decoded), so a
lone query pays no batching delay at all.

With batching off the same thread embeds one query per forward pass: the baseline.

The same batcher runs the object detector over query images (``crop=largest|all``):
``embed`` then takes a decoded query and its crop mode and gives back its crops
(shared/query.py's ``QueryEmbedder.crops``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The batched function: one output per input, in order (vectors for the model's tensors).
EmbedFn = Callable[[Sequence[Any]], Sequence[Any] | np.ndarray]


@dataclass(frozen=True)
class EmbedResult:
    vector: Any  # this item's output: an np.ndarray vector for the model
    queue_s: float  # from hand-over to the start of its forward pass
    embed_s: float  # the forward pass it shared
    batch_size: int


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did, for metrics."""

    size: int
    embed_s: float
    queue_waits_s: list[float]


@dataclass
class _Item:
    value: Any  # a preprocessed tensor for the model
    future: asyncio.Future[EmbedResult]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


def _resolve(future: asyncio.Future[EmbedResult], result: EmbedResult | BaseException) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _deliver(item: _Item, result: EmbedResult | BaseException) -> None:
    try:
        item.loop.call_soon_threadsafe(_resolve, item.future, result)
    except RuntimeError:
        # The request's event loop has closed: the server shut down and nobody is waiting.
        log.debug("dropping a result for a closed event loop")


class MicroBatcher:
    def __init__(
        self,
        embed: EmbedFn,
        *,
        max_size: int = 8,
        max_wait_s: float = 0.004,
        enabled: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "embed",
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._embed = embed
        self.max_size = max_size if enabled else 1
        self.max_wait_s = max_wait_s if enabled else 0.0
        self.enabled = enabled
        self._on_batch = on_batch
        self.name = name
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._incoming = 0  # queries being decoded that will arrive soon
        self._incoming_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the embed thread did not stop within %.0fs", timeout_s)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the request side --------------------------------------------------------------------

    def expect(self) -> None:
        """Announce a query that is being decoded and will call ``embed`` soon."""
        with self._incoming_lock:
            self._incoming += 1

    def withdraw(self) -> None:
        """The announced query will not come (its image failed to decode)."""
        with self._incoming_lock:
            self._incoming -= 1

    async def embed(self, value: Any, *, expected: bool = False) -> EmbedResult:
        """Embed one preprocessed image (or run the batched function on one ``value``).
        ``expected``: it was announced with ``expect``."""
        if not self.running:
            if expected:
                self.withdraw()
            raise RuntimeError("the micro-batcher is not running (app lifespan not started?)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EmbedResult] = loop.create_future()
        item = _Item(value, future, loop)
        if expected:
            # No longer "on its way" the moment it is queued: otherwise the collector, taking
            # this very item, would wait for it to arrive (a lone query paying max_wait).
            with self._incoming_lock:
                self._incoming -= 1
                self._queue.put(item)
        else:
            self._queue.put(item)
        return await future

    # -- the forward-pass thread -------------------------------------------------------------

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """The batch that starts with ``first``; True if a stop was requested meanwhile."""
        batch = [first]
        deadline = first.enqueued + self.max_wait_s
        while len(batch) < self.max_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._incoming <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Item)
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            assert isinstance(first, _Item)
            batch, stopping = self._gather(first)
            batch = [it for it in batch if not it.future.done()]
            if batch:
                self._forward(batch)
        # Whatever is still queued after a stop is answered, not dropped.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Item):
                self._forward([item])

    def _forward(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            vectors = self._embed([it.value for it in batch])
        except Exception as exc:  # reported to every waiting request, never lost
            log.exception("forward pass of %d queries failed", len(batch))
            for it in batch:
                _deliver(it, exc)
            return
        embed_s = time.perf_counter() - started
        waits = [started - it.enqueued for it in batch]
        for it, vector, wait in zip(batch, vectors, waits, strict=True):
            result = EmbedResult(vector, wait, embed_s, len(batch))
            _deliver(it, result)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), embed_s, waits))
