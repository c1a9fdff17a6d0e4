"""Header and body timeouts for HTTP connections, which uvicorn lacks.

Uvicorn's keep-alive timeout only runs between requests: a client that connects and sends half a
request line, or stops half-way through a body, holds its connection (and a file descriptor)
forever. :func:`timed_http_protocol` returns uvicorn's HTTP protocol class with two timers:

* headers: the request line and headers must be complete within ``header_timeout_s`` of the
  connection opening, or of the first byte of a later request on a kept-alive connection;
* body: while a body streams in, no gap between two reads may exceed ``body_timeout_s``
  (nginx's ``client_body_timeout``), so slow but steady uploads still work.

On expiry the connection is closed; an application already waiting for the body sees the client
disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)


def timed_http_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """Uvicorn's HTTP protocol (``Config(http=...)``) with the two timeouts above."""
    if header_timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError(f"need positive timeouts, got {header_timeout_s}, {body_timeout_s}")

    class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _waiting_for: str | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm("headers", header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow_the_request()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow_the_request(self) -> None:
            """Called after each read: which part of a request, if any, are we waiting for?"""
            if self.transport.is_closing():
                self._disarm()
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # Bytes of a new request: its headers' clock starts now (and is never reset).
                if self._waiting_for != "headers":
                    self._arm("headers", header_timeout_s)
            elif cycle.more_body:
                self._arm("body", body_timeout_s)  # reset on every read: an idle timeout
            else:
                self._disarm()  # the whole request is in; the application has it

        def _arm(self, what: str, seconds: float) -> None:
            self._disarm()
            self._waiting_for = what
            self._timer = self.loop.call_later(seconds, self._expired, what, seconds)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._waiting_for = None, None

        def _expired(self, what: str, seconds: float) -> None:
            self._timer, self._waiting_for = None, None
            if not self.transport.is_closing():
                log.info("closing an HTTP connection: its request %s stalled for %g s", what, seconds)
                self.transport.close()

    return TimedHTTPProtocol
