"""Per-request limits, as pure ASGI middleware (they see bodies as they stream).

* ``RequestLimits``: a head over ``API_MAX_HEADER_BYTES`` is 431 (the protocol refuses
  most of them while they arrive; this catches one that came in a single read); a body
  must arrive within ``API_BODY_TIMEOUT_S`` and never pause longer than
  ``API_BODY_IDLE_TIMEOUT_S``, else 408, so a slow or abandoned upload cannot hold its
  memory and its slot. A response sent before the body was read to its end (413, 408,
  503, 401...) says ``Connection: close``: the rest of that body is never read, so the
  connection cannot carry another request.
* ``ConcurrencyLimit``: at most ``API_MAX_CONCURRENT_REQUESTS`` requests in flight; more
  answer 503 ``overloaded`` with ``Retry-After`` at once, rather than queueing without
  bound. Probes and /metrics are exempt, so orchestrators and Prometheus always get an
  answer from a busy replica.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_api.errors import ApiError
from query_api.metrics import IN_FLIGHT, REFUSED

log = logging.getLogger(__name__)

# Cheap, answer-always endpoints: never refused for load.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_S = 1


def error_body(code: str, message: str) -> bytes:
    """The API's error shape (errors.py), for answers written below the framework."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(code, message)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


class BodyTimeout(ApiError):
    """The request body stalled or took too long; raised from ``receive``."""

    def __init__(self, message: str) -> None:
        super().__init__(408, "body_timeout", message)
        REFUSED.labels("body_timeout").inc()


def head_size(scope: Scope) -> int:
    """Bytes of the request line and headers, as they were on the wire (about)."""
    target = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(
        scope.get("query_string", b""))
    line = len(scope.get("method", "")) + target + 12  # " ", "?", " HTTP/1.1\r\n"
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


def _declares_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False


class _Body:
    """Deadlines of one request body, applied to each ``receive`` until it ends."""

    def __init__(self, receive: Receive, total_s: float, idle_s: float, declared: bool) -> None:
        self._receive = receive
        self.total_s = total_s
        self.idle_s = idle_s
        self.deadline = asyncio.get_running_loop().time() + total_s
        self.done = not declared

    async def receive(self) -> Message:
        if self.done:  # the body ended: what is left is waiting for a disconnect
            return await self._receive()
        remaining = self.deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise BodyTimeout(f"the request body did not arrive within {self.total_s:g} s")
        wait = min(self.idle_s, remaining)
        try:
            async with asyncio.timeout(wait):
                message = await self._receive()
        except TimeoutError:
            if wait < self.idle_s:
                raise BodyTimeout(
                    f"the request body did not arrive within {self.total_s:g} s") from None
            raise BodyTimeout(
                f"the request body stopped arriving: nothing for {self.idle_s:g} s") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.done = True
        return message


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_header_bytes: int, body_timeout_s: float,
                 body_idle_timeout_s: float) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.body_timeout_s = body_timeout_s
        self.body_idle_timeout_s = body_idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body(receive, self.body_timeout_s, self.body_idle_timeout_s,
                     _declares_body(scope))
        started = False

        async def send_closing_if_unread(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body.done:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"connection", b"close")]}
            await send(message)

        if head_size(scope) > self.max_header_bytes:
            REFUSED.labels("headers_too_large").inc()
            await send_error(send_closing_if_unread, 431, "headers_too_large",
                             f"the request line and headers are over "
                             f"{self.max_header_bytes:,} bytes")
            return
        try:
            await self.app(scope, body.receive, send_closing_if_unread)
        except BodyTimeout as exc:
            # Raised where nothing turned it into a response. Once a response has started
            # all that is left is to drop the connection (uvicorn does, on the exception).
            if started:
                raise
            await send_error(send_closing_if_unread, 408, exc.code, exc.message)


class ConcurrencyLimit:
    def __init__(self, app: ASGIApp, *, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.in_flight = 0  # the event loop is single-threaded: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_requests:
            REFUSED.labels("overloaded").inc()
            await send_error(send, 503, "overloaded",
                             f"the service is serving {self.max_requests} requests already; "
                             f"retry in {RETRY_AFTER_S} s",
                             [(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()
