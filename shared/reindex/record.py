"""A logical index's migration record: what the processes of a deployment agree on.

Kept in the store's catalog (shared/store/aliases.py), one JSON object per index. Its
top-level keys are written by different parties and merged by key, so none undoes
another's write:

* ``migration`` (``start``, ``finish``): which collections, how to load each spec, active;
* ``state`` (the backfill, ``swap``, ``rollback``, ``finish``): where the migration is;
* ``progress`` (the backfill only): counts, the scan's checkpoint, a heartbeat;
* ``gate`` (the gate): its last result;
* ``history`` (``finish``): the migrations before, so a process configured for a spec the
  index moved away from can follow it (shared/reindex/follow.py).

While ``migration.active`` is true, every ingest worker writes each event to both
collections (dual-writes), and the API keeps both specs loaded. Which collection *serves*
is never in the record: only the catalog's pointer says that.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# States, in the order a migration normally goes through them.
BACKFILLING = "backfilling"  # re-embedding every image of the source into the target
RECONCILING = "reconciling"  # comparing both, fixing what dual-writes and the scan raced on
READY = "ready"              # the gate passed: the target may serve
FAILED = "failed"            # the gate or the backfill failed; `status` says why
STOPPED = "stopped"          # the backfill was stopped; `start` resumes it
SWAPPED = "swapped"          # the target serves; the source is still written, for rollback
ROLLED_BACK = "rolled_back"  # the source serves again; the target is still written
FINISHED = "finished"        # one collection was dropped; dual-writes ended
STATES = (BACKFILLING, RECONCILING, READY, FAILED, STOPPED, SWAPPED, ROLLED_BACK, FINISHED)
RUNNING = (BACKFILLING, RECONCILING)  # a backfill process is (or should be) at work


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def owner() -> str:
    """Who is writing: host and pid, for `status` and for refusing a second backfill."""
    return f"{socket.gethostname()}:{os.getpid()}"


def new_id() -> str:
    return datetime.now(UTC).strftime("m-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Migration:
    """A read-only view of the record."""

    id: str
    logical: str
    source: str
    target: str
    source_load: dict[str, Any]
    target_load: dict[str, Any]
    source_spec: str
    target_spec: str
    active: bool
    started_at: str
    state: str
    state_detail: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Migration | None:
        body = dict((record or {}).get("migration") or {})
        if not body.get("id"):
            return None
        state = dict((record or {}).get("state") or {})
        return cls(
            id=str(body["id"]), logical=str(body.get("logical", "")),
            source=str(body["source"]), target=str(body["target"]),
            source_load=dict(body.get("source_load") or {}),
            target_load=dict(body.get("target_load") or {}),
            source_spec=str(body.get("source_spec", "")),
            target_spec=str(body.get("target_spec", "")),
            active=bool(body.get("active")), started_at=str(body.get("started_at", "")),
            state=str(state.get("name", BACKFILLING)), state_detail=str(state.get("detail", "")),
            progress=dict((record or {}).get("progress") or {}),
            gate=(record or {}).get("gate"),
        )

    @property
    def collections(self) -> tuple[str, str]:
        return self.source, self.target

    def load_of(self, physical: str) -> dict[str, Any] | None:
        if physical == self.source:
            return self.source_load
        if physical == self.target:
            return self.target_load
        return None

    @property
    def heartbeat_age_s(self) -> float | None:
        at = self.progress.get("updated_at")
        return None if at is None else max(0.0, time.time() - float(at))


def state_patch(name: str, detail: str = "") -> dict[str, Any]:
    return {"state": {"name": name, "detail": detail, "at": now_iso(), "by": owner()}}
