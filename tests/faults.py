"""A fault-injecting wrapper around a real store: every call reaches the real store,
except while an outage is switched on, when each call fails as a down server would."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from shared.errors import StoreError
from shared.store.base import VectorStore


class FlakyStore(VectorStore):
    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner
        self.spec = inner.spec
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.refused_calls = 0

    def fail_for(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _gate(self, what: str) -> None:
        if self.down:
            with self._lock:
                self.refused_calls += 1
            raise StoreError(f"injected outage: {what} refused (connection refused)")

    def upsert(self, records: Sequence[Any]) -> None:
        self._gate("upsert")
        self.inner.upsert(records)

    def delete(self, image_ids: Sequence[str]) -> None:
        self._gate("delete")
        self.inner.delete(image_ids)

    def search(self, vector: Any, **kwargs: Any) -> Any:
        self._gate("search")
        return self.inner.search(vector, **kwargs)

    def get(self, image_ids: Sequence[str], *, with_vector: bool = False) -> Any:
        self._gate("get")
        return self.inner.get(image_ids, with_vector=with_vector)

    def count(self, filters: Any = None) -> int:
        self._gate("count")
        return self.inner.count(filters)

    def ping(self) -> None:
        self._gate("ping")
        self.inner.ping()

    def optimize(self) -> None:
        self._gate("optimize")
        self.inner.optimize()

    def close(self) -> None:
        self.inner.close()
