"""uvicorn's h11 protocol with the limits uvicorn lacks: a header deadline, a JSON 431/400
for oversized or malformed heads, a connection cap that answers in JSON, and a lingering
close.

uvicorn (pinned to 0.54.0) times out idle keep-alive connections but nothing else: a
client that opens a connection and trickles its headers one byte at a time holds it
forever, and its default parser (httptools) buffers headers of any size. h11 bounds the
buffer (``h11_max_incomplete_event_size``); this subclass adds the deadline.

The deadline is armed when a connection opens and again when a response ends (the next
request's headers are due), and checked when it fires: still waiting for headers with a
partial request buffered is a 408; nothing buffered is an idle connection, closed quietly.
A request being served is left alone (its body has the deadlines of limits.py).

Closing a connection whose client is still sending (a 413 before the body ended, a 431
while the headers pour in) would make the kernel answer the unread bytes with a reset,
which can destroy the response before the client reads it. So such closes linger, as
nginx does: the response goes out, then a FIN; what still arrives is dropped, and the
socket really closes when the client closes its side or after ``LINGER_S``.

This relies on uvicorn internals (``self.conn``, ``self.app``, ``self.transport``,
``on_response_complete``, ``send_400_response``, ``limit_concurrency``), covered by
tests/test_api_hostile.py so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # as uvicorn does
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.server import ServerState

from query_api.limits import EXEMPT_PATHS, error_body
from query_api.metrics import REFUSED

log = logging.getLogger(__name__)

# Long enough for a client to read the response it was sent; short enough that a client
# that never stops sending cannot keep the connection.
LINGER_S = 2.0
DEFAULT_HEADER_TIMEOUT_S = 10.0


class _LingeringTransport:
    """The connection's transport, with ``close`` lingering while the client still sends.

    uvicorn closes transports from several places (the response cycle, its 400 answer,
    keep-alive expiry, shutdown); wrapping the transport covers them all.
    """

    def __init__(self, transport: asyncio.Transport, protocol: LimitedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if (self._transport.is_closing() or not self._transport.can_write_eof()
                or not self._protocol.client_may_be_sending()):
            self._transport.close()
            return
        try:
            self._transport.write_eof()  # once the answer is flushed: the client reads it all
        except OSError:  # the peer is gone already
            self._transport.close()
            return
        self._protocol.lingering = True
        self._transport.resume_reading()  # and read (then drop) what it still sends
        self._timer = self._protocol.loop.call_later(LINGER_S, self._transport.close)

    def abort(self) -> None:
        self._closing = True
        self.cancel_linger()
        self._transport.abort()

    def lost(self) -> None:
        """The connection is gone: nothing left to linger for."""
        self._closing = True
        self.cancel_linger()

    def cancel_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LimitedH11Protocol(H11Protocol):
    """See the module docstring. Settings come from ``config.header_timeout_s`` and the
    usual uvicorn fields (``limit_concurrency``, ``h11_max_incomplete_event_size``)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = float(getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))
        self.max_header_bytes = (config.h11_max_incomplete_event_size
                                 or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        # uvicorn's own cap answers in plain text and refuses probes too; ours is below.
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self._inner_app = self.app
        self.app = self._capped_app
        self._header_timer: asyncio.TimerHandle | None = None
        self.lingering = False

    # -- connection lifecycle ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if isinstance(self.transport, _LingeringTransport):
            self.transport.lost()
        self.lingering = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the answer is out; what the client still sends is dropped
        super().data_received(data)

    def on_response_complete(self) -> None:
        # Armed before uvicorn looks at pipelined data, which may hold the next headers.
        self._arm_header_timer()
        super().on_response_complete()

    def client_may_be_sending(self) -> bool:
        """True when the client may still be sending: a body we did not read to its end, a
        request head being received, or bytes h11 refused."""
        their = self.conn.their_state
        if their in (h11.SEND_BODY, h11.ERROR):
            return True
        return their is h11.IDLE and bool(self.conn.trailing_data[0].strip())

    # -- the header deadline -------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        ours, theirs = self.conn.our_state, self.conn.their_state
        if theirs is h11.IDLE and ours is h11.IDLE:
            if self.conn.trailing_data[0].strip():
                seconds = f"{self.header_timeout_s:g}"
                REFUSED.labels("header_timeout").inc()
                self.send_error(408, "header_timeout",
                                f"the request headers did not arrive within {seconds} s")
            else:  # an idle connection that never sent a request
                self.transport.close()
        elif ours in (h11.DONE, h11.MUST_CLOSE) and theirs is h11.SEND_BODY:
            # Answered already; the client is still sending a body nobody reads.
            self.transport.close()
        # Otherwise a request is being served: its body has deadlines of its own.

    # -- answers written by the protocol itself ------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """h11 refused what arrived: too many header bytes (431) or not HTTP (400)."""
        self._cancel_header_timer()
        if len(self.conn.trailing_data[0]) > self.max_header_bytes:
            REFUSED.labels("headers_too_large").inc()
            self.send_error(
                431, "headers_too_large",
                f"the request line and headers are over {self.max_header_bytes:,} bytes",
            )
        else:
            self.send_error(400, "bad_request", "the request is not valid HTTP/1.1")

    def send_error(self, status: int, code: str, message: str) -> None:
        """Answer with the API's JSON error body, then close the connection."""
        body = error_body(code, message)
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            output = self.conn.send(h11.Response(status_code=status, headers=headers,
                                                 reason=STATUS_PHRASES[status]))
            output = (output or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            output += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # A response was already under way: all that is left is to close.
            log.debug("cannot answer %d on this connection; closing it", status)
        else:
            self.transport.write(output)
        self.transport.close()

    # -- the connection cap --------------------------------------------------------------------

    async def _capped_app(self, scope: Any, receive: Any, send: Any) -> None:
        if (self.max_connections is not None and len(self.connections) > self.max_connections
                and scope.get("path") not in EXEMPT_PATHS):
            log.warning("%d connections open, over the cap of %d: answering 503",
                        len(self.connections), self.max_connections)
            REFUSED.labels("too_many_connections").inc()
            body = error_body("overloaded", "the service has too many open connections; "
                              "retry in a moment")
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self._inner_app(scope, receive, send)

