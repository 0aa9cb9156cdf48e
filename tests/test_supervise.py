"""The supervision rule and the one retry policy, on their own (fast, no broker)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from shared.errors import FetchError, StoreError, UndecodableImageError
from shared.pipeline.retry import Backoff, GaveUp, retrying
from shared.pipeline.supervise import Supervisor


def wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_exception_escaping_a_thread_is_fatal_and_reported() -> None:
    told: list[BaseException] = []
    supervisor = Supervisor("t", on_fatal=told.append)
    supervisor.spawn("boom", lambda: 1 / 0)
    wait_for(lambda: bool(told))  # the owner is told after the error is recorded
    health = supervisor.health()
    assert not health.alive and not health.ready and "ZeroDivisionError" in health.reason
    assert isinstance(told[0], ZeroDivisionError)


def test_a_thread_that_ends_unasked_is_fatal_but_not_after_stop() -> None:
    supervisor = Supervisor("t")
    supervisor.spawn("quits", lambda: None)
    wait_for(lambda: supervisor.error is not None)
    assert "ended unexpectedly" in str(supervisor.error)
    calm = Supervisor("t")
    calm.stop()
    calm.spawn("quits", lambda: None).join(2)
    assert calm.error is None and calm.health().alive


def test_an_outage_being_waited_out_is_unready_not_dead() -> None:
    supervisor = Supervisor("t", stall_s=0.2)
    supervisor.beat("loop")
    supervisor.waiting("store", "the store is failing, retrying")
    time.sleep(0.6)  # past twice the stall bound, but explained
    health = supervisor.health()
    assert health.alive and not health.ready
    supervisor.waiting("store", None)
    supervisor.beat("loop")
    assert supervisor.health().ready


def test_a_stall_is_unready_then_fatal() -> None:
    ages = {"age": 0.0}
    supervisor = Supervisor("t", stall_s=0.3)
    supervisor.watch_work(lambda: (ages["age"], "event 7 (embed)"))
    stop = threading.Event()
    supervisor.spawn("idle", stop.wait)
    assert supervisor.health().ready
    ages["age"] = 0.4
    health = supervisor.health()
    assert health.alive and not health.ready and "event 7" in health.reason
    ages["age"] = 0.7  # past twice the bound: the watchdog makes it fatal
    wait_for(lambda: supervisor.error is not None)
    assert not supervisor.health().alive
    stop.set()


def test_a_loop_that_stops_beating_is_unready() -> None:
    supervisor = Supervisor("t", stall_s=0.2)
    supervisor.beat("consume")
    assert supervisor.health().ready
    time.sleep(0.3)
    assert not supervisor.health().ready and "consume" in supervisor.health().reason


def test_backoff_is_capped_exponential_with_equal_jitter() -> None:
    backoff = Backoff(base_s=0.5, max_s=4.0)
    rng = random.Random(1)
    for attempt in range(12):
        delay = backoff.delay(attempt, rng)
        cap = min(4.0, 0.5 * 2**attempt)
        assert cap / 2 <= delay <= cap


def test_retrying_retries_only_what_may_succeed() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise StoreError("down")
        return "ok"

    waits: list[float] = []
    assert retrying(flaky, backoff=Backoff(0.01, 0.02), wait=waits.append) == "ok"
    assert calls["n"] == 3 and len(waits) == 2

    def bad() -> None:
        raise UndecodableImageError("never")

    with pytest.raises(UndecodableImageError):
        retrying(bad, backoff=Backoff(0.01, 0.02), wait=waits.append)
    assert len(waits) == 2  # no retry for an error that cannot pass


def test_retrying_gives_up_by_count_or_time() -> None:
    def timeout() -> None:
        raise FetchError("slow", reason="fetch_timeout")

    waits: list[float] = []
    with pytest.raises(FetchError):
        retrying(timeout, backoff=Backoff(0.01, 0.02), wait=waits.append, attempts=3)
    assert len(waits) == 3
    with pytest.raises(GaveUp):
        retrying(timeout, backoff=Backoff(0.05, 0.1), wait=time.sleep, give_up_after_s=0.2)


def test_work_that_waited_out_an_outage_is_not_a_stall_afterwards() -> None:
    supervisor = Supervisor("t", stall_s=0.3)
    supervisor.watch_work(lambda: (10.0, "event 1 (write)"))  # old: it waited for the store
    supervisor.waiting("store", "the store is failing, retrying")
    assert supervisor.health().alive and not supervisor.health().ready
    supervisor.waiting("store", None)  # recovered just now
    assert supervisor.health().ready
    time.sleep(0.4)
    health = supervisor.health()
    assert health.alive and not health.ready  # still not finished 0.4 s after recovery
