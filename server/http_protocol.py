"""uvicorn's h11 protocol with limits on what a connection may do before the application sees a request.

Stock uvicorn (0.54) sets no timer before a connection's first request, so a silent socket or a head trickled a
byte at a time holds a connection open for ever, and none while a request body arrives, so does a body that
stops half-way; it bounds only a head that arrives in several reads (h11's
buffer limit), so a large head read in one go reaches the application; and it answers malformed HTTP in plain
text. `GuardedH11Protocol` closes a connection whose request head takes longer than `header_timeout`, or whose
request body takes longer than `body_timeout` after its head, refuses
heads over `max_header_bytes` or `max_headers` with 431, and answers in the API's JSON error shape.

The subclass relies on `H11Protocol` internals (`conn`, `send_400_response`, the state it keeps), which is why
pyproject.toml pins uvicorn to the minor version it was written against.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from server.config import Settings
from server.errors import error_body

PEER_CLOSED = "windowlm.peer_closed"


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(settings.max_header_bytes, settings.max_headers, settings.header_timeout, settings.body_timeout)

    def head_problem(self, request: h11.Request) -> str | None:
        """Why a parsed request head breaks the limits, or None when it keeps to them."""
        if len(request.headers) > self.max_headers:
            return f"the request has {len(request.headers)} header fields; at most {self.max_headers} are allowed"
        if head_size(request) > self.max_header_bytes:
            return self.too_large_message()
        return None

    def too_large_message(self) -> str:
        return f"the request head is larger than {self.max_header_bytes} bytes"


def head_size(request: h11.Request) -> int:
    """Bytes of a request head as h11 parsed it: `METHOD target HTTP/1.1`, `name: value` lines, CRLFs, blank line.

    Whitespace h11 strips around values is not counted; such padding never reaches the application, and h11's
    buffer limit still bounds a head that does not arrive in one read."""
    request_line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    fields = sum(len(name) + len(value) + len(b": \r\n") for name, value in request.headers.raw_items())
    return request_line + fields + len(b"\r\n")


class LimitedConnection(h11.Connection):
    """h11's server side, which also refuses a complete request head over the limits.

    h11 bounds only an incomplete event (`max_incomplete_event_size`, set here to `max_header_bytes`): a head
    that arrives whole in one read passes it. For the response, `too_large` keeps why a head was refused and
    `refused_method` the method of a parsed head it refused (h11 frames a response to HEAD with no body)."""

    def __init__(self, limits: HttpLimits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.limits = limits
        self.too_large: str | None = None
        self.refused_method: bytes | None = None

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            if error.error_status_hint == 431:  # h11's "Receive buffer too long"
                self.too_large = self.limits.too_large_message()
            raise
        if isinstance(event, h11.Request):
            self.too_large = self.limits.head_problem(event)
            if self.too_large is not None:
                self.refused_method = event.method
                raise h11.RemoteProtocolError(self.too_large, error_status_hint=431)
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request timers, head limits and JSON errors.

    The head timer runs from the moment a connection is made, and on a kept-alive connection from the first
    byte of its next request (until then uvicorn's `timeout_keep_alive` guards the silence); when the head is
    complete, the body timer takes over until the body has arrived (also a body the application refused and
    uvicorn reads to drop). Responses, however long, are never timed by either."""

    def __init__(self, *args, limits: HttpLimits, **kwargs) -> None:
        """Replaces uvicorn's h11 connection (and so `h11_max_incomplete_event_size`) with a `LimitedConnection`."""
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.conn = LimitedConnection(limits)
        self.head_timer: asyncio.TimerHandle | None = None  # the head timer, then the body timer

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Also starts the head timer: uvicorn starts none before the first request."""
        super().connection_made(transport)
        self.start_head_timer()

    def data_received(self, data: bytes) -> None:
        """Also starts the head timer at a kept-alive request's first byte, the body timer once the head is
        parsed, and stops them once the body is complete."""
        if self.head_timer is None and self.conn.their_state is h11.IDLE:
            self.start_head_timer()
        reading_body = self.conn.their_state is h11.SEND_BODY
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:
            if not reading_body:
                self.start_head_timer(self.limits.body_timeout)
        elif self.conn.their_state is not h11.IDLE:
            self.stop_head_timer()

    def handle_events(self) -> None:
        """Also hands each request's scope a probe of its connection (`scope["extensions"]["windowlm.peer_closed"]`,
        to call on the event loop's thread): the engine asks it before giving a waiting request a slot."""
        super().handle_events()
        if self.scope is not None:
            self.scope.setdefault("extensions", {})[PEER_CLOSED] = self.peer_closed

    def peer_closed(self) -> bool:
        """Whether the client has gone: the connection is closing, or its end of file waits unread (uvicorn stops
        reading while a request runs, so a client's close can sit in the socket unseen). A peek consumes nothing."""
        if self.transport.is_closing():
            return True
        view = socket.socket(fileno=self.transport.get_extra_info("socket").fileno())
        try:
            return view.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # nothing to read: still connected
            return False
        except OSError:
            return True
        finally:
            view.detach()  # the socket stays the transport's

    def connection_lost(self, exc: Exception | None) -> None:
        """Also stops the head timer."""
        self.stop_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Answers malformed HTTP, and heads over the limits (431), in the JSON error shape; uvicorn answers
        both with a plain-text 400. Called by uvicorn when h11 raises RemoteProtocolError; closes the connection."""
        too_large = self.conn.too_large
        status, code = (431, "request_header_fields_too_large") if too_large else (400, "invalid_http_request")
        message = too_large or "invalid HTTP request"
        body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status])
        data = h11.Data(data=b"" if self.conn.refused_method == b"HEAD" else body)
        for event in (response, data, h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def start_head_timer(self, seconds: float | None = None) -> None:
        self.stop_head_timer()
        self.head_timer = self.loop.call_later(seconds or self.limits.header_timeout, self.head_timeout)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timeout(self) -> None:
        """The request head or body did not arrive in time: close the connection, with no response."""
        self.head_timer = None
        if not self.transport.is_closing():
            self.logger.debug("Closing a connection whose request did not arrive in time.")
            self.transport.close()
