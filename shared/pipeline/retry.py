"""Retry with capped exponential backoff: the one policy for every transient failure.

Fetches, store writes, dead-letter flushes and offset commits all wait out failures
here. What is worth retrying is decided by the error itself (``ImgSearchError.retriable``),
never by matching messages; how long to wait between tries is ``Backoff``; how to wait
is the caller's (a worker keeps polling Kafka while it waits, a thread just sleeps).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shared.errors import ImgSearchError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """``base_s`` doubled per attempt, capped at ``max_s``, with "equal jitter": half of
    each delay is fixed and half random, so retries neither hammer a recovering server
    nor march in lockstep with other workers'."""

    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        capped = min(self.max_s, self.base_s * 2 ** min(attempt, 30))
        return capped * (0.5 + (rng or random).random() / 2)


class GaveUp(ImgSearchError):
    """Retries ran out (attempts or time); ``__cause__`` is the last failure."""

    reason = "retries_exhausted"


def retrying(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    wait: Callable[[float], None] = time.sleep,
    attempts: int | None = None,
    give_up_after_s: float | None = None,
    on_failure: Callable[[ImgSearchError, int, float], None] | None = None,
    on_recovery: Callable[[int], None] | None = None,
) -> T:
    """Call ``fn`` until it returns. A retriable ImgSearchError is retried after
    ``backoff.delay(attempt)`` (``on_failure(error, attempt, delay)`` is told first);
    any other exception propagates at once. ``wait`` may raise to abandon the retries.

    ``attempts`` bounds the number of retries and re-raises the last error once they are
    used up; ``give_up_after_s`` bounds the time and raises GaveUp.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            result = fn()
        except ImgSearchError as exc:
            if not exc.retriable or (attempts is not None and attempt >= attempts):
                raise
            delay = backoff.delay(attempt)
            if give_up_after_s is not None and time.monotonic() + delay - started > give_up_after_s:
                raise GaveUp(f"still failing after {time.monotonic() - started:.0f}s "
                             f"and {attempt + 1} tries: {exc}") from exc
            attempt += 1
            if on_failure is not None:
                on_failure(exc, attempt, delay)
            wait(delay)
            continue
        if attempt and on_recovery is not None:
            on_recovery(attempt)
        return result
