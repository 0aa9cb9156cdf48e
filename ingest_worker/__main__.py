"""``python -m ingest_worker``: consume image events until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
import time

from prometheus_client import start_http_server

from ingest_worker.service import WorkerGroup
from shared.components import Components
from shared.config import load_settings
from shared.errors import ImgSearchError
from shared.logs import setup_logging

log = logging.getLogger("ingest_worker")


def main() -> int:
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
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
        log.info("metrics on http://%s:%d/metrics", settings.worker_metrics_host,
                 settings.worker_metrics_port)
    group = WorkerGroup(components)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: finishing the current batch, then stopping", signal.Signals(signum).name)
        group.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    group.start()
    try:
        while group.alive:
            time.sleep(0.2)
    finally:
        group.close()
        components.close()
    if group.errors:
        log.error("stopped on error: %s", group.errors[0])
        return 1
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
