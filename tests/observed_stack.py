"""The ingest workers and the query API in one process, each with its own metrics port,
for tests/test_dashboards.py to scrape with a real Prometheus.

Production runs them as separate containers (``python -m ingest_worker``, ``python -m
query_api``); here one process must hold the embedded store, so this runs what those two
entry points run, side by side:

* ingest_worker.service.WorkerGroup, with prometheus_client's metrics server on
  --worker-metrics-port (as ``python -m ingest_worker`` starts it);
* uvicorn serving query_api.app.create_app(components) on --api-port (as ``python -m
  query_api`` does), which serves GET /metrics itself.

Both expose the one default registry, so each port also shows the other's metrics;
Prometheus tells the two targets apart by their job label, as in production.

    python -m tests.observed_stack --worker-metrics-port 9100 --api-port 8000

Configuration comes from the environment (shared/config.py). Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn

from ingest_worker.probes import ProbeServer
from ingest_worker.service import WorkerGroup
from query_api.app import create_app
from shared.components import Components
from shared.config import load_settings
from shared.kafka import EventPublisher
from shared.logs import setup_logging

log = logging.getLogger("observed_stack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.observed_stack")
    parser.add_argument("--worker-metrics-port", type=int, required=True)
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    settings = load_settings()
    setup_logging(settings.log_level)
    components = Components.load(settings)
    publisher = EventPublisher(settings)
    server = uvicorn.Server(uvicorn.Config(
        create_app(components, publisher=publisher, settings=settings),
        host=args.host, port=args.api_port, log_level="warning", log_config=None,
    ))
    group = WorkerGroup(components)
    # The worker's own endpoint: /metrics and its probes, as `python -m ingest_worker` serves.
    probes = ProbeServer(args.host, args.worker_metrics_port, group.health).start()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stopping.set()
        server.should_exit = True

    # uvicorn.Server.run() would install its own handlers; ours stop the workers too.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    group.start()
    watchdog = threading.Thread(target=_stop_api_if_workers_fail, args=(group, server, stopping),
                                daemon=True)
    watchdog.start()
    try:
        server.run()
    finally:
        group.close()
        probes.stop()
        publisher.close()
        components.close()
    if group.errors:
        log.error("workers failed: %r", group.errors[0])
        return 1
    return 0


def _stop_api_if_workers_fail(group: WorkerGroup, server: uvicorn.Server,
                              stopping: threading.Event) -> None:
    """A worker that dies must fail the run, not leave a half-working stack behind."""
    while not stopping.wait(0.5):
        if group.errors or not group.alive:
            log.error("the ingest workers stopped (%r); stopping the API", group.errors[:1])
            server.should_exit = True
            return


if __name__ == "__main__":
    sys.exit(main())
