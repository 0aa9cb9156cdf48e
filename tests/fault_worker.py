"""``python tests/fault_worker.py FAULT``: the real ``python -m ingest_worker``, with one
fault injected into one of its threads. Used by tests/test_robustness.py.

Faults about one event (the event's id starts with ``poison``) must end as that event's
dead letter; faults in a thread's own machinery must make the process exit non-zero.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest_worker import __main__ as worker_main  # noqa: E402
from ingest_worker.dead_letters import DeadLetterQueue  # noqa: E402
from ingest_worker.probes import ProbeServer  # noqa: E402
from ingest_worker.worker import IngestWorker  # noqa: E402
from shared.pipeline.scheduler import Scheduler  # noqa: E402
from shared.pipeline.stages import IngestPipeline  # noqa: E402


def _poisoned(events: Any) -> bool:
    return any(str(getattr(e, "image_id", "")).startswith("poison") for e in events)


def _after_first_poison(fn_name: str, owner: Any, fault: BaseException) -> None:
    """Replace ``owner.fn_name`` so that it raises once a poison event has been seen."""
    original = getattr(owner, fn_name)
    armed = threading.Event()
    original_submit = Scheduler.submit

    def submit(self: Scheduler, item: Any, **kw: Any) -> None:
        if str(item.event.image_id).startswith("poison"):
            armed.set()
        original_submit(self, item, **kw)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            raise fault
        return original(self, *args, **kwargs)

    Scheduler.submit = submit  # type: ignore[method-assign]
    setattr(owner, fn_name, patched)


def inject(fault: str) -> None:
    # -- about one event: dead letter, the worker goes on ------------------------------------
    if fault == "prepare-event":
        original_prepare = IngestPipeline.prepare

        def prepare(self: IngestPipeline, event: Any, existing: Any) -> Any:
            if event.image_id.startswith("poison"):
                raise KeyError("injected: a bug met while preparing this event")
            return original_prepare(self, event, existing)

        IngestPipeline.prepare = prepare  # type: ignore[method-assign]
    elif fault == "embed-event":
        original_embed = IngestPipeline.embed

        def embed(self: IngestPipeline, batch: Any) -> Any:
            if _poisoned(event for event, _ in batch):
                raise ValueError("injected: the model chokes on this event")
            return original_embed(self, batch)

        IngestPipeline.embed = embed  # type: ignore[method-assign]
    elif fault == "write-event":
        original_write = IngestPipeline.write

        def write(self: IngestPipeline, records: Any, deletes: Any) -> None:
            if any(r.image_id.startswith("poison") for r in records):
                raise TypeError("injected: the store's client cannot convert this payload")
            original_write(self, records, deletes)

        IngestPipeline.write = write  # type: ignore[method-assign]
    # -- in a thread's own machinery: the process exits non-zero ------------------------------
    elif fault == "prepare-thread":
        _after_first_poison("_prepare", Scheduler, RuntimeError("injected: prepare pool broke"))
    elif fault == "embed-thread":
        _after_first_poison("_embed", Scheduler, RuntimeError("injected: embed loop broke"))
    elif fault == "write-thread":
        _after_first_poison("_write", Scheduler, RuntimeError("injected: write loop broke"))
    elif fault == "consume-loop":
        _after_first_poison("_settle", IngestWorker, RuntimeError("injected: consume loop broke"))
    elif fault == "dead-letters":
        # A dead letter is due (the poison event is refused); its flush itself breaks.
        original_prepare = IngestPipeline.prepare

        def refuse(self: IngestPipeline, event: Any, existing: Any) -> Any:
            if event.image_id.startswith("poison"):
                from shared.errors import UndecodableImageError
                raise UndecodableImageError("injected: not an image")
            return original_prepare(self, event, existing)

        def flush(self: DeadLetterQueue, timeout_s: float = 30.0) -> None:
            raise RuntimeError("injected: the dead-letter producer broke")

        IngestPipeline.prepare = refuse  # type: ignore[method-assign]
        DeadLetterQueue.flush = flush  # type: ignore[method-assign]
    elif fault == "rebalance":
        def revoked(self: IngestWorker, partitions: Any, *, lost: bool) -> None:
            raise RuntimeError("injected: the rebalance listener broke")

        IngestWorker.partitions_revoked = revoked  # type: ignore[method-assign]
    elif fault == "probes":
        original_start = ProbeServer.start

        def start(self: ProbeServer, spawn: Any = None) -> ProbeServer:
            original_start(self, spawn)
            # The metrics server dies a little after start-up, as a crashed thread would.
            threading.Timer(8.0, self.server.shutdown).start()
            return self

        ProbeServer.start = start  # type: ignore[method-assign]
    elif fault == "stall":
        original_embed = IngestPipeline.embed

        def hang(self: IngestPipeline, batch: Any) -> Any:
            if _poisoned(event for event, _ in batch):
                time.sleep(3600)  # stuck, as in a C call that never returns
            return original_embed(self, batch)

        IngestPipeline.embed = hang  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(worker_main.main())
