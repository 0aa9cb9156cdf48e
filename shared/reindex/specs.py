"""What one process serves and writes while an index may be migrating.

``IndexWatch`` polls the catalog (the index's pointer and its migration record) every
REINDEX_POLL_S and tells its listener when either changes; ``poke`` asks for a poll now
(a swap made in this process is followed at once).

``SpecSet`` holds the Components of every physical collection this process needs: the one
that serves, and while a migration is active its other collection too. Each is loaded
once (a second spec of the same model and weights shares the first one's embedder) and
shared by everything in the process (``imgsearch up`` gives one SpecSet to its workers and
its API). Its listeners (ingest_worker/service.py, query_api/serving.py) hear of a new
state only once what it needs is loaded; a collection no longer needed is closed
REINDEX_FINISH_GRACE_S later, when nobody writes to it any more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.components import Components
from shared.config import Settings
from shared.reindex import metrics
from shared.reindex.record import Migration
from shared.reindex.spec import load_settings_of, same_model, with_spec
from shared.store.aliases import Catalog, FileCatalog, spec_digest, spec_info
from shared.store.base import innermost
from shared.store.factory import open_catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexState:
    serving: str | None  # the physical collection the index's pointer resolves to
    migration: Migration | None  # the latest migration, active or not

    @property
    def active(self) -> Migration | None:
        return self.migration if self.migration is not None and self.migration.active else None

    @property
    def needed(self) -> tuple[str, ...]:
        """Collections to write (and to keep loaded): the serving one first."""
        names = [self.serving] if self.serving else []
        if self.active is not None:
            names += [self.active.source, self.active.target]
        return tuple(dict.fromkeys(names))

    def key(self) -> tuple[Any, ...]:
        """What listeners act on (progress heartbeats are not part of it)."""
        m = self.migration
        return (self.serving, m.id if m else None, m.active if m else None,
                m.state if m else None)


def catalog_for(components: Components) -> Catalog:
    """The catalog of the store ``components`` opened (the same client or directory)."""
    backend = innermost(components.store)
    from shared.store.edge import EdgeStore

    if isinstance(backend, EdgeStore):
        return FileCatalog(backend.directory.parent)
    if hasattr(backend, "client"):
        from shared.store.qdrant import QdrantCatalog

        return QdrantCatalog(backend.client)  # type: ignore[attr-defined]
    return open_catalog(components.settings)


class IndexWatch:
    def __init__(self, catalog: Catalog, logical: str, interval_s: float, *,
                 on_change: Callable[[IndexState], None]) -> None:
        self.catalog = catalog
        self.logical = logical
        self.interval_s = interval_s
        self.state: IndexState | None = None
        self._on_change = on_change
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        # One refresh at a time, its listener included: states are heard in order.
        self._lock = threading.RLock()

    def refresh(self) -> IndexState | None:
        """Poll once; tell the listener if what it acts on changed. A catalog that does not
        answer leaves the last state in force (logged once per outage)."""
        with self._lock:
            try:
                serving = self.catalog.resolve(self.logical)
                migration = Migration.from_record(self.catalog.read_record(self.logical))
            except Exception as exc:  # noqa: BLE001 - keep serving what we have
                if not self._failing:
                    log.warning("cannot read index %r's pointer and migration record (keeping "
                                "the last known state): %s", self.logical, exc)
                self._failing = True
                return self.state
            if self._failing:
                log.info("index %r's catalog answers again", self.logical)
            self._failing = False
            state = IndexState(serving, migration)
            metrics.observe(self.logical, migration)
            changed = self.state is None or state.key() != self.state.key()
            self.state = state
            if changed:
                try:
                    self._on_change(state)
                except Exception:  # a listener's bug must not stop the watch
                    log.exception("acting on index %r's new state failed", self.logical)
            return state

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"index-watch-{self.logical}",
                                        daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)


class SpecSet:
    def __init__(self, primary: Components | None, *, settings: Settings | None = None,
                 catalog: Catalog | None = None, poll_s: float | None = None,
                 preload: bool = True) -> None:
        """``primary``: the Components the process started with (its owner closes them);
        None for a process that loads every collection it needs here (the CLI).
        ``preload``: load what a new state needs at once (serving processes); the CLI
        loads only what an operation uses."""
        self.primary = primary
        settings = settings or (primary.settings if primary is not None else None)
        assert settings is not None, "SpecSet needs its primary Components or settings"
        self.settings = settings
        self.logical = settings.qdrant_collection
        if catalog is None:
            catalog = catalog_for(primary) if primary is not None else open_catalog(settings)
        self.catalog = catalog
        self.grace_s = settings.reindex_finish_grace_s
        self._lock = threading.RLock()
        self._loaded: dict[str, Components] = (
            {primary.store.spec.name: primary} if primary is not None else {})
        self._retire_at: dict[str, float] = {}
        self.errors: dict[str, str] = {}  # collection -> why it could not be loaded
        self._listeners: list[Callable[[IndexState], None]] = []
        self.watch = IndexWatch(self.catalog, self.logical,
                                self.settings.reindex_poll_s if poll_s is None else poll_s,
                                on_change=self._on_state)
        self._started = False
        self.preload = preload

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> IndexState | None:
        """Poll once (so the first state is known before anyone consumes or serves), then
        keep polling in the background. Idempotent."""
        if not self._started:
            self._started = True
            self.watch.refresh()
            self.watch.start()
        return self.state

    def close(self) -> None:
        """Stop watching; close every Components this set loaded (not the primary: its
        owner closes it)."""
        self.watch.stop()
        with self._lock:
            loaded = [c for c in self._loaded.values() if c is not self.primary]
            self._loaded = {n: c for n, c in self._loaded.items() if c is self.primary}
        for components in loaded:
            _close(components)
        self.catalog.close()

    def subscribe(self, listener: Callable[[IndexState], None]) -> None:
        """``listener(state)`` on the watch thread after each change, once what the new
        state needs is loaded."""
        self._listeners.append(listener)

    @property
    def state(self) -> IndexState | None:
        return self.watch.state

    # -- components ---------------------------------------------------------------------------------

    def add(self, components: Components) -> None:
        """Hand over Components loaded elsewhere (a new target collection just created)."""
        with self._lock:
            self._loaded.setdefault(components.store.spec.name, components)

    def components(self, physical: str) -> Components | None:
        with self._lock:
            return self._loaded.get(physical)

    def loaded(self) -> dict[str, Components]:
        with self._lock:
            return dict(self._loaded)

    def load(self, physical: str, load: Mapping[str, Any] | None = None) -> Components:
        """The Components of ``physical``, loaded now if need be (a model load: seconds).
        ``load``: its spec settings; by default those its metadata keeps."""
        with self._lock:
            found = self._loaded.get(physical)
            if found is not None:
                self._retire_at.pop(physical, None)
                return found
            metadata = self.catalog.stored_metadata(physical)
            if metadata is None:  # never create it here: it was dropped, or never made
                raise LookupError(f"collection {physical!r} does not exist")
            if load is None:
                load = spec_info(metadata).get("load")
            if not load:
                raise LookupError(
                    f"collection {physical!r} does not record how to load its model (it was "
                    "made before that was kept); start any process configured for it once")
            settings = with_spec(self.settings, load)
            share = next((c.embedder for c in self._loaded.values()
                          if same_model(load_settings_of(c.settings), load)), None)
            log.info("loading collection %r of index %r (model %s)", physical, self.logical,
                     settings.model_name)
            components = Components.load(settings, embedder=share, collection=physical)
            self._loaded[physical] = components
            self.errors.pop(physical, None)
            return components

    def spec_of(self, physical: str) -> str:
        """The short spec digest of a loaded collection ('' if unknown)."""
        found = self.components(physical)
        if found is None:
            return ""
        return spec_digest(found.store.stored_metadata)[:12]

    # -- following the index --------------------------------------------------------------------

    def refresh(self) -> IndexState | None:
        """Poll now, in this thread (after this process changed the index itself)."""
        return self.watch.refresh()

    def _on_state(self, state: IndexState) -> None:
        migration = state.active
        for physical in state.needed if self.preload else ():
            if self.components(physical) is not None:
                continue
            try:
                self.load(physical, migration.load_of(physical) if migration else None)
            except Exception as exc:  # noqa: BLE001 - reported; retried on the next change
                self.errors[physical] = f"{type(exc).__name__}: {exc}"
                log.error("cannot load collection %r of index %r: %s (this process keeps "
                          "what it has; it tries again when the index changes)",
                          physical, self.logical, exc)
        for listener in self._listeners:
            try:
                listener(state)
            except Exception:
                log.exception("a listener of index %r failed", self.logical)
        self._retire(state)

    def _retire(self, state: IndexState) -> None:
        """Close what is no longer needed, REINDEX_FINISH_GRACE_S after it stopped being."""
        now = time.monotonic()
        due: list[Components] = []
        with self._lock:
            for physical in list(self._loaded):
                if physical in state.needed:
                    self._retire_at.pop(physical, None)
                    continue
                at = self._retire_at.setdefault(physical, now + self.grace_s)
                if at <= now and self._loaded[physical] is not self.primary:
                    due.append(self._loaded.pop(physical))
                    self._retire_at.pop(physical, None)
        for components in due:
            log.info("closing collection %r: index %r no longer uses it",
                     components.store.spec.name, self.logical)
            _close(components)
        if self._retire_at:
            # Come back when the next one is due, even if nothing else changes.
            timer = threading.Timer(max(0.1, min(self._retire_at.values()) - now) + 0.05,
                                    self._retire_later)
            timer.daemon = True
            timer.start()

    def _retire_later(self) -> None:
        state = self.state
        if state is not None and not self.watch._stop.is_set():
            self._retire(state)

    def drop_now(self, physical: str) -> None:
        """Close ``physical`` at once (before this process deletes it)."""
        with self._lock:
            components = self._loaded.pop(physical, None)
            self._retire_at.pop(physical, None)
        if components is not None:
            _close(components)


def _close(components: Components) -> None:
    try:
        components.close()
    except Exception as exc:  # noqa: BLE001 - closing what is going away anyway
        log.warning("closing collection %r: %s", components.store.spec.name, exc)
