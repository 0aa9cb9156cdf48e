"""The operations on an index's migration: start, run (backfill, reconcile, gate), swap,
rollback, finish, status. The CLI (imgsearch/reindex.py), ``imgsearch up`` and the API's
admin endpoints all call these.

A migration's life::

    start ──▶ backfilling ──▶ reconciling ──▶ ready ──swap──▶ swapped ──finish──▶ finished
                  │ ▲                           │ ▲              │ ▲            (source dropped)
             stop │ │ start (resumes)     gate  │ │ swap    roll- │ │ swap
                  ▼ │                    fails  ▼ │          back ▼ │
                stopped                        failed          rolled_back ──finish──▶
                                                                            (target dropped)

From ``start`` to ``finish`` the workers write every event to both collections, so either
can serve at any moment and a rollback finds the source current.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.components import Components, collection_spec
from shared.config import Settings
from shared.errors import ImgSearchError
from shared.reindex import record as rec
from shared.reindex.backfill import Backfill, GateResult, Stopped
from shared.reindex.record import Migration, now_iso, owner, state_patch
from shared.reindex.spec import load_settings_of, same_model, with_spec
from shared.reindex.specs import SpecSet
from shared.store.aliases import (
    compatible,
    describe_spec,
    physical_name,
    spec_digest,
    spec_info,
)

log = logging.getLogger(__name__)

# Another backfill whose heartbeat is younger than this is still at work.
STALE_AFTER_S = 30.0


class ReindexError(ImgSearchError):
    """The operation does not apply now (no migration, another one running, the gate failed)."""

    reason = "reindex"
    stage = "config"


@dataclass
class Status:
    logical: str
    serving: str | None
    serving_spec: str
    collections: list[str]
    migration: Migration | None
    record: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        m = self.migration
        out: dict[str, Any] = {
            "index": self.logical, "serving": self.serving, "serving_spec": self.serving_spec,
            "collections": self.collections, "migration": None,
        }
        if m is not None:
            out["migration"] = {
                "id": m.id, "active": m.active, "state": m.state, "detail": m.state_detail,
                "source": m.source, "target": m.target, "source_spec": m.source_spec,
                "target_spec": m.target_spec, "started_at": m.started_at,
                "progress": m.progress, "gate": m.gate,
                "heartbeat_age_s": None if m.heartbeat_age_s is None
                else round(m.heartbeat_age_s, 1),
            }
        return out


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backfill_running_elsewhere(migration: Migration) -> str | None:
    """Who else is backfilling this migration now (None: nobody, or a dead process)."""
    progress = migration.progress
    who = str(progress.get("owner") or "")
    age = migration.heartbeat_age_s
    if not who or who == owner() or age is None or age > STALE_AFTER_S:
        return None
    if migration.state not in rec.RUNNING:
        return None
    host, _, pid = who.rpartition(":")
    import socket

    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return None  # killed: its checkpoint is ours to resume
    return who


class Reindex:
    """Operations on one index's migrations, with the Components of ``specs`` (the
    process's loaded collections: shared with its workers and API in ``imgsearch up``)."""

    def __init__(self, specs: SpecSet, *, say: Callable[[str], None] | None = None) -> None:
        self.specs = specs
        self.settings: Settings = specs.settings
        self.catalog = specs.catalog
        self.logical = specs.logical
        self.say = say or log.info
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        return self.catalog.read_record(self.logical) or {}

    def migration(self) -> Migration | None:
        return Migration.from_record(self.record())

    def active(self) -> Migration:
        m = self.migration()
        if m is None or not m.active:
            raise ReindexError(f"index {self.logical!r} has no migration in progress")
        return m

    def status(self) -> Status:
        serving = self.catalog.resolve(self.logical)
        metadata = self.catalog.stored_metadata(serving) if serving else None
        record = self.record()
        return Status(self.logical, serving,
                      f"{describe_spec(metadata)} [{spec_digest(metadata)[:12]}]"
                      if metadata else "", self.catalog.collections(self.logical),
                      Migration.from_record(record), record)

    # -- start ------------------------------------------------------------------------------------

    def start(self, target: dict[str, Any]) -> Migration:
        """Begin a migration of the index to the spec ``target`` (spec settings: see
        shared/reindex/spec.py), or return the one in progress to that spec (to resume)."""
        with self._lock:
            return self._start(target)

    def _start(self, target: dict[str, Any]) -> Migration:
        serving = self.catalog.resolve(self.logical)
        if serving is None:
            raise ReindexError(
                f"index {self.logical!r} has no collection yet: nothing to migrate. Start the "
                "workers (or `imgsearch up`) with the new spec and they create it.")
        source_meta = self.catalog.stored_metadata(serving)
        target_settings = with_spec(self.settings, {**load_settings_of(self.settings), **target})
        target_load = load_settings_of(target_settings)
        current = self.migration()
        if current is not None and current.active:
            wanted = self._spec_of(target_settings, reuse_only=True)
            if wanted is not None and wanted == current.target:
                return current
            raise ReindexError(
                f"index {self.logical!r} is migrating to {current.target} ({current.target_spec},"
                f" state {current.state}): finish it (`imgsearch reindex finish`) or roll it "
                "back and finish it before starting another")
        source_load = spec_info(source_meta).get("load")
        if not source_load:
            if compatible(collection_spec(self.settings, self._embedder_for(self.settings)),
                          source_meta):
                source_load = load_settings_of(self.settings)
            else:
                raise ReindexError(
                    f"collection {serving!r} does not record how to load its model ({describe_spec(source_meta)}): "
                    "it was made before that was kept. Start any process (a worker, the API, "
                    "`imgsearch up`) configured for it once, and it records it.")
        physical = self._spec_of(target_settings)
        assert physical is not None
        if physical == serving:
            raise ReindexError(f"index {self.logical!r} already serves this spec "
                               f"({describe_spec(source_meta)}) from {serving!r}")
        target_meta = self.catalog.stored_metadata(physical)
        body = {
            "id": rec.new_id(), "logical": self.logical, "active": True,
            "source": serving, "target": physical,
            "source_load": source_load, "target_load": target_load,
            "source_spec": f"{describe_spec(source_meta)} [{spec_digest(source_meta)[:12]}]",
            "target_spec": f"{describe_spec(target_meta)} [{spec_digest(target_meta)[:12]}]",
            "started_at": now_iso(), "started_by": owner(),
        }
        self.catalog.update_record(self.logical, {
            "migration": body, **state_patch(rec.BACKFILLING), "progress": {}, "gate": None})
        self.say(f"reindex: started {body['id']}: {serving} ({body['source_spec']}) -> "
                 f"{physical} ({body['target_spec']}); workers write both from now on")
        self.specs.refresh()
        migration = self.migration()
        assert migration is not None
        return migration

    def _embedder_for(self, settings: Settings) -> Any:
        load = load_settings_of(settings)
        for components in self.specs.loaded().values():
            if same_model(load_settings_of(components.settings), load):
                return components.embedder
        from shared.embedding import Embedder

        return Embedder.from_settings(settings)

    def _spec_of(self, settings: Settings, *, reuse_only: bool = False) -> str | None:
        """The physical collection for ``settings``'s spec: an existing collection of the
        index built for it (a previous migration's), else a new one, created now."""
        embedder = self._embedder_for(settings)
        spec = collection_spec(settings, embedder)
        for name in self.catalog.collections(self.logical):
            if compatible(spec, self.catalog.stored_metadata(name)):
                return name
        if reuse_only:
            return None
        name = physical_name(self.logical, spec.metadata())
        self.say(f"reindex: creating collection {name} for {settings.model_name}")
        components = Components.load(settings, embedder=embedder, collection=name)
        self.specs.add(components)
        return name

    # -- run: backfill, reconcile, gate ----------------------------------------------------------

    def components(self, physical: str, migration: Migration) -> Components:
        return self.specs.load(physical, migration.load_of(physical))

    def run(self, *, stop: threading.Event | None = None, swap: bool = False,
            on_progress: Callable[[dict[str, Any]], None] | None = None,
            allow_missing: bool = False) -> GateResult | None:
        """Backfill the active migration from its checkpoint, reconcile, gate; swap when
        ``swap`` and the gate passes. None when stopped (the checkpoint is saved)."""
        migration = self.active()
        if migration.state in (rec.SWAPPED, rec.ROLLED_BACK):
            raise ReindexError(f"migration {migration.id} is {migration.state}: its backfill "
                               "is done; swap, roll back or finish it")
        busy = backfill_running_elsewhere(migration)
        if busy is not None:
            raise ReindexError(f"migration {migration.id} is being backfilled by {busy} "
                               f"(heartbeat {migration.heartbeat_age_s:.0f}s ago)")
        source = self.components(migration.source, migration)
        target = self.components(migration.target, migration)

        def report(progress: dict[str, Any]) -> None:
            self.catalog.update_record(self.logical, {"progress": progress})
            if on_progress is not None:
                on_progress(progress)

        backfill = Backfill(source, target, settings=self.settings, stop=stop,
                            on_progress=report)
        resume = migration.progress if migration.progress.get("offset") else None
        self.catalog.update_record(self.logical, state_patch(
            rec.BACKFILLING, "resumed" if resume else ""))
        if resume:
            self.say(f"reindex: resuming {migration.id} after "
                     f"{resume.get('checkpoint_done', 0)} images")
        try:
            counts = backfill.run(resume)
            self.say(f"reindex: backfill done: {counts.reembedded} re-embedded, "
                     f"{counts.failed} failed of {counts.total}")
            # The embedded engine builds its search index only when told (a server does it
            # in the background): before the new collection serves, like `up` after indexing.
            started = time.monotonic()
            target.store.optimize()
            if time.monotonic() - started > 1:
                self.say(f"reindex: built the new collection's search index in "
                         f"{time.monotonic() - started:.1f}s")
            self.catalog.update_record(self.logical, state_patch(rec.RECONCILING))
            result = backfill.gate(sample=self.settings.reindex_gate_sample,
                                   min_ratio=self.settings.reindex_gate_min,
                                   rounds=self.settings.reindex_reconcile_rounds,
                                   allow_missing=allow_missing)
        except Stopped:
            self.catalog.update_record(self.logical, {
                "progress": backfill.progress(), **state_patch(rec.STOPPED, "stopped")})
            self.say("reindex: stopped; `imgsearch reindex start` (or `up`) resumes it")
            return None
        except Exception as exc:
            self.catalog.update_record(self.logical, {
                "progress": backfill.progress(),
                **state_patch(rec.FAILED, f"{type(exc).__name__}: {exc}"[:500])})
            raise
        progress = backfill.progress("done")
        self.catalog.update_record(self.logical, {
            "progress": progress, "gate": result.as_record(),
            **state_patch(rec.READY if result.passed else rec.FAILED,
                          "; ".join(result.reasons))})
        self.say(_gate_line(result))
        if result.passed and swap:
            self.swap(gate=result)
        return result

    # -- swap, rollback, finish --------------------------------------------------------------------

    def check(self, *, allow_missing: bool = False) -> GateResult:
        """The gate, now (reconcile first)."""
        migration = self.active()
        backfill = Backfill(self.components(migration.source, migration),
                            self.components(migration.target, migration),
                            settings=self.settings)
        return backfill.gate(sample=self.settings.reindex_gate_sample,
                             min_ratio=self.settings.reindex_gate_min,
                             rounds=self.settings.reindex_reconcile_rounds,
                             allow_missing=allow_missing)

    def swap(self, *, gate: GateResult | None = None, allow_missing: bool = False) -> GateResult:
        """Make the target serve, if the gate passes (run now unless just run)."""
        with self._lock:
            migration = self.active()
            serving = self.catalog.resolve(self.logical)
            if serving == migration.target:
                raise ReindexError(f"{migration.target} serves already (state {migration.state})")
            if backfill_running_elsewhere(migration):
                raise ReindexError(f"migration {migration.id} is still backfilling: wait for "
                                   "it (`imgsearch reindex status`)")
            result = gate if gate is not None else self.check(allow_missing=allow_missing)
            self.catalog.update_record(self.logical, {"gate": result.as_record()})
            if not result.passed:
                self.catalog.update_record(self.logical, state_patch(
                    rec.FAILED, "; ".join(result.reasons)))
                raise ReindexError("the swap's gate failed: " + "; ".join(result.reasons))
            self.catalog.switch(self.logical, migration.target)
            self.catalog.update_record(self.logical, state_patch(rec.SWAPPED))
            self.say(f"reindex: swapped: {migration.target} ({migration.target_spec}) serves "
                     f"index {self.logical!r}; {migration.source} is kept and still written "
                     "until `imgsearch reindex finish`")
            self.specs.refresh()
            return result

    def rollback(self) -> Migration:
        """Make the source serve again (it is current: the workers wrote it throughout)."""
        with self._lock:
            migration = self.active()
            if self.catalog.resolve(self.logical) == migration.source:
                raise ReindexError(f"{migration.source} serves already (state "
                                   f"{migration.state}): nothing to roll back")
            self.catalog.switch(self.logical, migration.source)
            self.catalog.update_record(self.logical, state_patch(rec.ROLLED_BACK))
            self.say(f"reindex: rolled back: {migration.source} ({migration.source_spec}) "
                     f"serves index {self.logical!r} again; {migration.target} is kept")
            self.specs.refresh()
            return self.active()

    def finish(self, *, wait: Callable[[float], None] = time.sleep) -> Migration:
        """End the migration: dual-writes stop, and the collection that does not serve is
        dropped (the source after a swap; the target otherwise, which cancels it)."""
        with self._lock:
            migration = self.active()
            if backfill_running_elsewhere(migration):
                raise ReindexError(f"migration {migration.id} is still backfilling: stop it "
                                   "first (Ctrl-C in its terminal)")
            serving = self.catalog.resolve(self.logical)
            swapped = serving == migration.target
            dropped = migration.source if swapped else migration.target
            dropped_meta = self.catalog.stored_metadata(dropped)
            history = list(self.record().get("history") or [])
            history.append({
                "id": migration.id, "source": migration.source, "target": migration.target,
                "outcome": "finished" if swapped else "cancelled", "dropped": dropped,
                # What the index moved away from: a process still configured for it follows
                # the index (shared/reindex/follow.py).
                "source_info": _identity_info(dropped_meta) if swapped else None,
                "finished_at": now_iso(),
            })
            self.catalog.update_record(self.logical, {
                "migration": {**self.record()["migration"], "active": False,
                              "finished_at": now_iso()},
                **state_patch(rec.FINISHED, f"dropped {dropped}"), "history": history[-20:]})
            self.specs.refresh()
            grace = self.settings.reindex_finish_grace_s
            self.say(f"reindex: dual-writes end; dropping {dropped} in {grace:g}s, once no "
                     "worker writes to it")
            wait(grace)
            self.specs.drop_now(dropped)
            self.catalog.drop(self.logical, dropped)
            self.say(f"reindex: finished {migration.id}: dropped {dropped}; "
                     f"{serving} serves index {self.logical!r}")
            migration = self.migration()
            assert migration is not None
            return migration


def _identity_info(metadata: Any) -> dict[str, Any]:
    """The part of a collection's metadata that says what its vectors mean (no matrix)."""
    info = spec_info(metadata)
    reduction = info.get("reduction")
    keep = {k: v for k, v in info.items() if k not in ("load", "reduction")}
    if reduction:
        keep["reduction"] = {"identity": reduction.get("identity")}
    return keep


def _gate_line(result: GateResult) -> str:
    if result.passed:
        return (f"reindex: gate passed: the new collection holds every image "
                f"({result.diff['target']}), {result.found_first}/{result.sample} sampled "
                "images come back first")
    return "reindex: gate failed: " + "; ".join(result.reasons)

