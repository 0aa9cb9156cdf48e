"""One supervision rule for every thread of an ingest process.

* An unexpected exception about one event is that event's failure: the stage turns it
  into ``InternalError`` and the event is dead-lettered (shared/pipeline/scheduler.py).
* Anything else that escapes a thread (a bug in a loop, a dead pool, a stage that
  stopped moving) is *fatal*: the supervisor records it, readiness drops at once, and
  ``on_fatal`` tells the owner to exit non-zero so an orchestrator restarts the
  process. Nothing is committed for work that did not finish, so a restart replays it.
* Readiness is computed when asked, from facts: a fatal error, a dead thread, a wait
  on an outage (``waiting``), a loop that stopped beating, or in-flight work older than
  ``stall_s``. Nothing has to remember to set a flag back.

A stall that outlasts twice ``stall_s`` while nothing explains it (no outage being
waited out) becomes fatal too: a thread stuck in a C call cannot be interrupted, but
the process can be restarted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Returns (age in seconds, what it is) of the oldest unfinished work, or None when idle.
OldestWork = Callable[[], tuple[float, str] | None]


@dataclass(frozen=True)
class Health:
    alive: bool  # false: restart me (fatal error, dead thread, a stall past its bound)
    ready: bool  # false: do not count on me now (also while waiting out an outage)
    reason: str = "ok"


class Supervisor:
    def __init__(self, name: str, *, stall_s: float = 300.0,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self.stall_s = stall_s
        self.error: BaseException | None = None
        self.error_where = ""
        self._on_fatal: list[Callable[[BaseException], None]] = [on_fatal] if on_fatal else []
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._beats: dict[str, float] = {}  # loop name -> last beat (monotonic)
        self._waits: dict[str, str] = {}  # what is waiting out an outage -> description
        self._waited_until = 0.0  # when the last outage wait ended (monotonic)
        self._work: list[OldestWork] = []
        self._stopping = False
        self._watchdog: threading.Thread | None = None

    # -- what the owner wires up ---------------------------------------------------------------

    def on_fatal(self, callback: Callable[[BaseException], None]) -> None:
        self._on_fatal.append(callback)

    def watch_work(self, oldest: OldestWork) -> None:
        """Count ``oldest()`` in stall detection (a scheduler's in-flight jobs)."""
        self._work.append(oldest)

    def spawn(self, name: str, target: Callable[..., Any], *args: Any) -> threading.Thread:
        """Run ``target`` on a daemon thread; an exception escaping it is fatal, and so is
        the thread ending while the supervisor is not stopping."""
        thread = threading.Thread(target=self._run, args=(name, target, args), name=name,
                                  daemon=True)
        with self._lock:
            self._threads[name] = thread
        thread.start()
        self._start_watchdog()
        return thread

    def _run(self, name: str, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - the point of a supervisor
            self.fatal(name, exc)
            return
        if not self._stopping and self.error is None:
            self.fatal(name, RuntimeError(f"thread {name} ended unexpectedly"))

    @contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Code that must not fail: anything escaping it is fatal (and not re-raised)."""
        try:
            yield
        except BaseException as exc:  # noqa: BLE001
            self.fatal(where, exc)

    def fatal(self, where: str, exc: BaseException) -> None:
        with self._lock:
            first = self.error is None
            if first:
                self.error, self.error_where = exc, where
        if not first:
            log.debug("%s: further failure in %s after a fatal error: %r", self.name, where, exc)
            return
        log.critical("%s: %s failed; this process must restart: %s: %s", self.name, where,
                     type(exc).__name__, exc, exc_info=exc)
        for callback in self._on_fatal:
            try:
                callback(exc)
            except Exception:  # noqa: BLE001 - reporting must not mask the first error
                log.exception("%s: a fatal-error callback failed", self.name)

    def stop(self) -> None:
        """Threads may end now without that being an error."""
        self._stopping = True

    # -- progress ------------------------------------------------------------------------------

    def beat(self, loop: str) -> None:
        """A loop went round: it is alive and not stuck."""
        self._beats[loop] = time.monotonic()

    def forget(self, loop: str) -> None:
        self._beats.pop(loop, None)

    def waiting(self, what: str, description: str | None) -> None:
        """``what`` is (``description`` given) or is no longer (None) waiting out an outage:
        not ready meanwhile, but not stalled either."""
        with self._lock:
            if description is None:
                if self._waits.pop(what, None) is not None:
                    self._waited_until = time.monotonic()
            else:
                self._waits[what] = description

    # -- verdict ---------------------------------------------------------------------------------

    def health(self) -> Health:
        if self.error is not None:
            return Health(False, False, f"{self.error_where} failed: {self.error!r}"[:500])
        with self._lock:
            threads = dict(self._threads)
            waits = dict(self._waits)
        for name, thread in threads.items():
            if not thread.is_alive() and not self._stopping:
                return Health(False, False, f"thread {name} is not running")
        now = time.monotonic()
        for loop, at in list(self._beats.items()):
            if now - at > self.stall_s:
                # An outage being waited out explains a loop that waits; nothing else does.
                return Health(bool(waits) or now - at <= 2 * self.stall_s, False,
                              f"{loop} loop has not moved for {now - at:.0f}s")
        if waits:
            return Health(True, False, "; ".join(waits.values()))
        for oldest in self._work:
            found = oldest()
            # Time spent waiting out an outage is not a stall: work waited for good reason.
            if found is not None and min(found[0], now - self._waited_until) > self.stall_s:
                age, what = min(found[0], now - self._waited_until), found[1]
                return Health(age <= 2 * self.stall_s, False,
                              f"{what} has been in flight for {age:.0f}s")
        return Health(True, True)

    def _start_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is not None:
                return
            self._watchdog = threading.Thread(target=self._watch, name=f"{self.name}-watchdog",
                                              daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        """Turn a stall that nothing explains into a fatal error, so the process restarts."""
        period = max(0.05, min(1.0, self.stall_s / 10))
        while not self._stopping and self.error is None:
            time.sleep(period)
            health = self.health()
            if not health.alive and self.error is None and not self._stopping:
                self.fatal("watchdog", RuntimeError(health.reason))
