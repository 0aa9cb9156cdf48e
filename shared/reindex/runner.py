"""A migration run in the background of a serving process (``imgsearch up``, its admin API):
start (or resume) it, backfill, reconcile, gate, and swap when the gate passes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from shared.reindex.backfill import GateResult
from shared.reindex.controller import Reindex, ReindexError

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, reindex: Reindex, *, swap: bool = True,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 on_end: Callable[[GateResult | None, BaseException | None], None] | None = None
                 ) -> None:
        self.reindex = reindex
        self.swap = swap
        self.on_progress = on_progress
        self.on_end = on_end
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: GateResult | None = None
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, target: dict[str, Any] | None = None) -> None:
        """Start a migration to ``target`` (spec settings), or resume the active one (None),
        in a thread. Raises ReindexError at once when it cannot start."""
        if self.running:
            raise ReindexError("a migration is running in this process already")
        if target is not None:
            self.reindex.start(target)
        else:
            self.reindex.active()
        self.stop_event.clear()
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, name="reindex", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.reindex.run(stop=self.stop_event, swap=self.swap,
                                           on_progress=self.on_progress)
        except BaseException as exc:
            self.error = exc
            log.error("the migration failed: %s", exc, exc_info=not isinstance(exc, ReindexError))
        if self.on_end is not None:
            self.on_end(self.result, self.error)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the backfill (its checkpoint is saved) and wait for the thread."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout_s)
