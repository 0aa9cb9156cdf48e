"""``python -m ingest_worker``: consume image events until SIGTERM or SIGINT.

Exit status: 0 after a clean stop, 1 after a fatal error (the orchestrator restarts the
process; nothing unfinished was committed, so the events are redelivered), 2 when it
cannot start (bad settings, no model, a collection built for another model).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("ingest_worker")


def _exit_soon(code: int, after_s: float) -> None:
    """Leave with ``code`` even if cleanup hangs (a thread stuck in a C call after a fatal
    error would otherwise keep the interpreter alive forever)."""

    def hard_exit() -> None:
        time.sleep(after_s)
        log.error("cleanup did not finish in %.0fs; exiting with status %d now", after_s, code)
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=hard_exit, name="exit-watchdog", daemon=True).start()


def main() -> int:
    # Signals first: an orchestrator may stop a worker while it is still importing torch or
    # loading the model (a scale-down right after a scale-up), and that is a clean stop
    # (status 0), not death by SIGTERM. The heavy imports therefore come after this.
    stop = threading.Event()
    stopping: list[Callable[[], None]] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the current batch, then stopping", signal.Signals(signum).name)
        stop.set()
        for callback in stopping:
            callback()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from ingest_worker.probes import ProbeServer
    from ingest_worker.service import WorkerGroup
    from shared.components import Components
    from shared.config import load_settings
    from shared.errors import ImgSearchError
    from shared.logs import setup_logging

    try:
        settings = load_settings()
    except ImgSearchError as exc:
        print(f"ingest_worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        components = Components.load(settings)
    except ImgSearchError as exc:
        log.error("cannot start: %s", exc)
        return 2
    if stop.is_set():
        components.close()
        log.info("stopped before starting")
        return 0
    group = WorkerGroup(components)
    stopping.append(group.stop)
    probes = None
    if settings.worker_metrics_port:
        probes = ProbeServer(settings.worker_metrics_host, settings.worker_metrics_port,
                             group.health).start(group.supervisor.spawn)
        log.info("metrics and probes on http://%s:%d/ (/metrics, /healthz, /readyz)",
                 settings.worker_metrics_host, probes.port)

    group.start()
    if stop.is_set():  # a signal between the check above and stopping.append
        group.stop()
    try:
        while group.alive and not group.errors:
            time.sleep(0.2)
    finally:
        if group.errors:
            _exit_soon(1, 20.0)
        group.close(timeout_s=3.0 if group.errors else None)
        components.close()
        if probes is not None:
            probes.stop()
    if group.errors:
        log.error("stopped on a fatal error (exit status 1): %s", group.errors[0])
        return 1
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
