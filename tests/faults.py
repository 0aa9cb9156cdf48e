"""A fault-injecting wrapper around a real store: every call reaches the real store,
except while an outage is switched on, when each call fails as a down server would."""

from __future__ import annotations

import threading
import time

from shared.errors import StoreError
from shared.store.base import ForwardingStore, VectorStore


class FlakyStore(ForwardingStore):
    def __init__(self, inner: VectorStore) -> None:
        super().__init__(inner)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.refused_calls = 0

    def fail_for(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _forward(self, what: str) -> VectorStore:
        """Every call but ``close`` fails while the outage lasts."""
        if self.down:
            with self._lock:
                self.refused_calls += 1
            raise StoreError(f"injected outage: {what} refused (connection refused)")
        return self.inner
