"""uvicorn's h11 HTTP protocol with a deadline for request headers and JSON answers to broken HTTP.

Why: uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``), but
not a fresh connection that never sends a request, nor one that trickles its headers a byte at a time: each
such socket would stay open for ever. Here a connection must deliver complete request headers within
``header_timeout`` seconds of connecting (or of its last response); the app bounds the body itself
(``--request-timeout``, answered with 408). HTTP the parser rejects gets a JSON 400 like every other error.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: seconds a connection has to deliver a request's headers; the server sets it from --request-timeout
DEFAULT_HEADER_TIMEOUT = 30.0


class TimedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections whose request headers do not arrive in time."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the header deadline as soon as the client connects."""
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        """Feed uvicorn; a new request (headers complete) stops the deadline, bytes between requests start it.

        Bytes that arrive after a response while the old request's body is still being discarded (a 413
        or 503 answered before the body was read) also count as waiting: the discarding is bounded too.
        """
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._disarm()
        elif self._waiting_for_headers() and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Answer HTTP the parser rejects (bad framing, bad Content-Length...) with JSON, then close."""
        body = json.dumps({"error": f"invalid HTTP request: {msg}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            try:
                self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # h11 may refuse to answer in its error state: just close
                break
        self.transport.close()
