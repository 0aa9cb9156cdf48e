"""``python -m query_api``: serve the query API with uvicorn (one worker; see metrics.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import uvicorn

from query_api.app import create_app
from query_api.publishing import producer_overrides
from query_api.server import server_config
from shared.components import Components
from shared.config import load_settings
from shared.errors import ImgSearchError
from shared.kafka import EventPublisher, make_producer
from shared.logs import setup_logging

log = logging.getLogger("query_api")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m query_api",
        description="Serve the image search API. Configuration comes from environment "
        "variables (API_HOST, API_PORT, QDRANT_*, MODEL_*, ...); flags override host and port.",
    )
    parser.add_argument("--host", help="listen address (default: API_HOST)")
    parser.add_argument("--port", type=int, help="listen port (default: API_PORT)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("api_host", args.host), ("api_port", args.port)) if v}
    try:
        settings = load_settings(**overrides)
    except ImgSearchError as exc:
        print(f"query_api: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        components = Components.load(settings)
    except ImgSearchError as exc:
        # Includes CollectionMismatchError: never serve a collection built by another model.
        log.error("cannot start: %s", exc)
        print(f"query_api: cannot start: {exc}", file=sys.stderr)
        return 2

    def make_publisher() -> EventPublisher:
        # Bounded so POST /images answers 503 in time when the broker is down.
        overrides = producer_overrides(settings.api_publish_timeout_s)
        return EventPublisher(settings, make_producer(settings, **overrides))

    app = create_app(components, settings=settings, publisher_factory=make_publisher)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    # handlers it found. Ours only notes it, so the store is closed below and we exit 0.
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    server = uvicorn.Server(server_config(app, settings))
    try:
        server.run()
    finally:
        components.close()
    if received:
        log.info("stopped on %s", signal.Signals(received[0]).name)
    if not server.started:
        return 3  # uvicorn's start-up failure status (it logged why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
