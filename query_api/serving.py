"""The API follows its index: it answers with the spec its index's pointer serves.

Every collection the index needs (the serving one; while a migration is active, its other
one too) gets its own QueryEngine: its model, micro-batchers and decode pool, over that
collection. They come from the process's SpecSet (shared/reindex/specs.py), which polls
the index's pointer and migration record every REINDEX_POLL_S: so a new spec's model is
loaded and warmed up as soon as a migration starts, long before the swap, and after the
swap the API switches to it without a restart or a gap.

Each request is pinned to one engine when it starts (``PinServing``, a context variable):
its embedding and its search always use the same spec, even when a swap lands in between.
``service.engine`` is an ``EngineProxy``: every attribute is the pinned engine's, and its
``store`` forwards each call to the pinned engine's store, so the routes need no change.
Responses say which spec served them: the ``spec`` field and the ``X-Imgsearch-Spec``
header; /readyz too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_api import metrics
from query_api.engine import QueryEngine
from query_api.pinned import PINNED, Pinned
from shared.components import Components
from shared.config import Settings
from shared.reindex import metrics as reindex_metrics
from shared.reindex.specs import IndexState, SpecSet
from shared.store.aliases import spec_digest
from shared.store.base import ForwardingStore, VectorStore

log = logging.getLogger(__name__)

# An engine no longer needed is closed this long after the last switch away from it, so
# the requests pinned to it finish first.
RETIRE_AFTER_S = 30.0


def _pinned_for(engine: QueryEngine, collection: str) -> Pinned:
    return Pinned(collection, spec_digest(engine.store.stored_metadata)[:12],
                  engine.embedder.info.name, engine)


class Serving:
    def __init__(self, engine: QueryEngine, components: Components, settings: Settings, *,
                 specs: SpecSet | None = None) -> None:
        self.settings = settings
        self.specs = specs if specs is not None else SpecSet(components)
        self._own_specs = specs is None
        first = components.store.spec.name
        self._entries: dict[str, Pinned] = {first: _pinned_for(engine, first)}
        self.current = self._entries[first]
        self._lock = threading.Lock()
        self._following = threading.Lock()  # one _follow at a time
        self._timers: list[threading.Timer] = []
        self.engine = EngineProxy(self)
        self.runner: Any = None  # `imgsearch up`'s in-process migration (imgsearch/up_reindex.py)
        self.logical = settings.qdrant_collection

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first engine, then follow the index (loading what it needs now)."""
        self.current.engine.start()
        self._observe(self.current)
        self.specs.subscribe(self._follow)
        state = self.specs.start() if self._own_specs else self.specs.state
        if state is not None:
            self._follow(state)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            entry.engine.close()
        if self._own_specs:
            self.specs.close()

    # -- which engine ---------------------------------------------------------------------------------

    def pinned(self) -> Pinned:
        return PINNED.get() or self.current

    def entry(self, collection: str) -> Pinned | None:
        with self._lock:
            return self._entries.get(collection)

    def _follow(self, state: IndexState) -> None:
        """Load an engine for each collection the index needs; serve the pointer's."""
        with self._following:
            self._follow_locked(state)

    def _follow_locked(self, state: IndexState) -> None:
        for physical in state.needed:
            if self.entry(physical) is not None:
                continue
            components = self.specs.components(physical)
            if components is None:
                continue  # SpecSet logged why; tried again on the next change
            engine = QueryEngine(components.embedder, components.store, components.settings,
                                 components.cropper)
            try:
                engine.start()  # warmed up before any request may use it
            except Exception:
                log.exception("cannot start a query engine for collection %r", physical)
                engine.close()
                continue
            with self._lock:
                self._entries[physical] = _pinned_for(engine, physical)
            log.info("query engine ready for collection %r (%s)", physical,
                     components.settings.model_name)
        target = self.entry(state.serving) if state.serving else None
        if target is not None and target is not self.current:
            previous, self.current = self.current, target
            log.info("index %r now served by collection %r (spec %s, model %s), was %r",
                     self.logical, target.collection, target.spec, target.model,
                     previous.collection)
            self._observe(target)
        elif state.serving and target is None:
            log.error("index %r is served by %r, which this API could not load: it keeps "
                      "answering from %r (consistent, but not the serving spec)",
                      self.logical, state.serving, self.current.collection)
        stale = [name for name in list(self._entries) if name not in state.needed
                 and self._entries[name] is not self.current]
        if stale:
            timer = threading.Timer(RETIRE_AFTER_S, self._retire, args=(stale,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def _retire(self, names: list[str]) -> None:
        state = self.specs.state
        for name in names:
            with self._lock:
                entry = self._entries.get(name)
                if entry is None or entry is self.current or (state and name in state.needed):
                    continue
                del self._entries[name]
            log.info("closing the query engine of collection %r", name)
            entry.engine.close()

    def _observe(self, entry: Pinned) -> None:
        info = entry.engine.embedder.info
        metrics.MODEL.info({"model": info.name, "dim": str(info.dim),
                            "device": str(entry.engine.embedder.device)})
        reindex_metrics.observe_serving(self.logical, entry.collection, entry.spec)

    # -- what /readyz says --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        pinned = self.pinned()
        state = self.specs.state
        migration = state.migration if state is not None else None
        return {
            "spec": pinned.spec,
            "serving_collection": pinned.collection,
            "loaded": sorted(self._entries),
            "migration": None if migration is None or not migration.active else {
                "id": migration.id, "state": migration.state, "source": migration.source,
                "target": migration.target,
                "done": migration.progress.get("done"), "total": migration.progress.get("total"),
            },
            "load_errors": dict(self.specs.errors) or None,
        }

    @property
    def middleware(self) -> Callable[[ASGIApp], ASGIApp]:
        return lambda app: PinServing(app, self)


class PinnedStore(ForwardingStore):
    """The pinned engine's store, call by call (routes keep ``engine.store`` for good)."""

    def __init__(self, serving: Serving) -> None:  # no inner of its own
        self._serving = serving

    @property  # type: ignore[override]
    def inner(self) -> VectorStore:
        store: VectorStore = self._serving.pinned().engine.store
        return store

    def close(self) -> None:
        """The engines' stores belong to their Components."""


class EngineProxy:
    """A QueryEngine whose every attribute is the pinned engine's."""

    def __init__(self, serving: Serving) -> None:
        self._serving = serving
        self.store = PinnedStore(serving)

    def serving_info(self) -> dict[str, Any]:
        return self._serving.info()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._serving.pinned().engine, name)


class PinServing:
    """ASGI middleware: pin each HTTP request to the engine serving when it starts, and
    say which spec answered (X-Imgsearch-Spec, X-Imgsearch-Collection)."""

    def __init__(self, app: ASGIApp, serving: Serving) -> None:
        self.app = app
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pinned = self.serving.current
        token = PINNED.set(pinned)
        headers = [(b"x-imgsearch-spec", pinned.spec.encode()),
                   (b"x-imgsearch-collection", pinned.collection.encode())]

        async def send_with_spec(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_spec)
        finally:
            PINNED.reset(token)
