"""The spec a request is served with, pinned when it starts (query_api/serving.py).

A leaf module (no query_api imports), so the wire models can read it for their ``spec``
field without an import cycle.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pinned:
    collection: str  # the physical collection searched
    spec: str  # its spec digest (12 hex characters)
    model: str
    engine: Any  # query_api.engine.QueryEngine


PINNED: ContextVar[Pinned | None] = ContextVar("imgsearch_pinned_spec", default=None)


def current_spec() -> str | None:
    pinned = PINNED.get()
    return pinned.spec if pinned is not None else None


def current_collection() -> str | None:
    pinned = PINNED.get()
    return pinned.collection if pinned is not None else None
