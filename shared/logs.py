"""One logging format for every entry point."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # kafka-python logs every reconnect at INFO; keep the worker's own lines readable.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
