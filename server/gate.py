"""What every HTTP request passes before a route sees it, cheapest check first (the request head's size, field
count and arrival time are bounded earlier, by server/http_protocol.py):

1. give it an id, the client's `X-Request-Id` when it is sane (printable ASCII, no spaces, at most 128
   characters) or a new one, sent back as `x-request-id` on every answer the app gives (errors and streams
   too) and held in `request_id` for the access log line; count it by endpoint and status (whatever the
   answer);
2. while draining, 503 for everything but the probes and /metrics;
3. the API key, when the server has keys, on every route but /health, /ready and the playground's page and
   assets (and /metrics or the docs when a setting opens them), read from the headers before one byte of the
   body is: 401 with `WWW-Authenticate: Bearer`; keys are compared as SHA-256 digests in constant time;
4. the body, read whole up to `max_body_bytes` (413 as soon as Content-Length or the bytes received pass it,
   chunked bodies included), then handed to the route as if it came from the socket.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.errors import APIError, InvalidRequest, Unauthorized, Unavailable, error_response
from server.routes.playground import playground_paths
from server.state import ServerState

logger = logging.getLogger("windowlm.server")

ENDPOINTS = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/ready",
    "/metrics",
}
PROBES = {"/health", "/ready"}
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
OPEN_WHILE_DRAINING = {*PROBES, "/metrics"}
REQUEST_ID_HEADER = b"x-request-id"
IGNORED_FIELDS = "ignored_fields"  # the key server/body.py sets in the request's state
IGNORED_FIELDS_HEADER = b"x-windowlm-ignored-fields"
SANE_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # printable ASCII without spaces

# The id of the request being answered, set by the gate for everything that runs under it: uvicorn writes its
# access log line inside the gate's `send`, so a logging filter can read it there (server/serve.py).
request_id: ContextVar[str | None] = ContextVar("windowlm_request_id", default=None)


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"


def open_without_key(settings: Settings) -> set[str]:
    """The paths a server with API keys answers without one: the probes, the playground's page and assets (they
    hold no data; the API calls the page makes need the key), and /metrics or the docs when a setting opens them."""
    paths = PROBES | (playground_paths() if settings.playground else set())
    return paths | ({"/metrics"} if settings.public_metrics else set()) | (DOCS if settings.public_docs else set())


def endpoint_label(path: str) -> str:
    """A bounded label for the request counter: unknown paths are 'other'."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-Id when it is sane, else a new id (uuid4, hex)."""
    given = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), None)
    if given is not None and SANE_REQUEST_ID.fullmatch(given):
        return given.decode("ascii")
    return uuid.uuid4().hex


def with_request_id(message: Message, rid: str, scope: Scope) -> Message:
    """A response start carrying `x-request-id: rid` (in place of any the app set), and the request's ignored
    fields when the body parser found some (server/body.py puts them in the request's state)."""
    headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != REQUEST_ID_HEADER]
    headers.append((REQUEST_ID_HEADER, rid.encode("ascii")))
    ignored = scope.get("state", {}).get(IGNORED_FIELDS)
    if ignored:
        headers.append((IGNORED_FIELDS_HEADER, ignored.encode("ascii")))
    return {**message, "headers": headers}


def content_length(scope: Scope) -> bytes | None:
    return next((value for name, value in scope["headers"] if name == b"content-length"), None)


def key_matches(header: bytes, digests: list[bytes]) -> bool:
    """Whether `Authorization: Bearer KEY` carries one of the keys; every digest is compared, in constant time."""
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    given = hashlib.sha256(token.strip()).digest()  # the key's bytes as sent (UTF-8 for a non-ASCII key)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(given, digest)
    return matched


class RequestGate:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.open_paths = open_without_key(state.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, started = 500, False
        rid = request_id_of(scope)
        token = request_id.set(rid)

        async def send_and_record(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = with_request_id(message, rid, scope)
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is None:
                refusal, receive = await self.read_body(scope, receive)
            if receive is None:  # the client left before its body arrived: nobody to answer
                status = 499
            elif refusal is not None:
                await error_response(refusal, close=not self.small_body(scope))(scope, receive, send_and_record)
            else:
                await self.run_app(scope, receive, send_and_record, lambda: started)
        finally:
            request_id.reset(token)
            metrics = self.state.metrics
            metrics.answered(endpoint_label(scope["path"]), status)
            if 400 <= status < 500 and status not in (401, 404, 429, 499):
                metrics.failed("validation")

    async def run_app(self, scope: Scope, receive: Receive, send: Send, started: Callable[[], bool]) -> None:
        """The app; an exception it raises before answering becomes a 500 in the API's error shape, sent here so
        it carries the request id (Starlette's own handler of last resort sits outside this gate)."""
        try:
            await self.app(scope, receive, send)
        except Exception as error:
            if started():
                raise
            logger.exception("internal error answering %s %s", scope.get("method"), scope["path"])
            await error_response(APIError(f"internal error: {type(error).__name__}"))(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        """The answer to give from the request head alone, or None to go on."""
        path = scope["path"]
        if self.state.draining and path not in OPEN_WHILE_DRAINING:
            return Unavailable("the server is shutting down")
        digests = self.state.api_key_digests
        if digests and path not in self.open_paths:
            authorization = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not key_matches(authorization, digests):
                return Unauthorized("a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
        return None

    def small_body(self, scope: Scope) -> bool:
        """Whether the request has no body or announced one within the limit. Such a body, left unread by a
        refusal, is read and dropped by the HTTP layer so the connection can go on: closing with it unread would
        make the kernel reset the connection, which can destroy the response before the client reads it. A body
        too large or of unknown length (chunked) is not worth reading: the connection is closed instead."""
        if any(name == b"transfer-encoding" for name, _ in scope["headers"]):
            return False
        length = content_length(scope)
        return length is None or (length.isdigit() and int(length) <= self.state.settings.max_body_bytes)

    async def read_body(self, scope: Scope, receive: Receive) -> tuple[APIError | None, Receive | None]:
        """The whole body (at most max_body_bytes), and a receive that hands it to the app before the socket's
        own messages (a disconnect, later); None for the receive when the client left first."""
        limit = self.state.settings.max_body_bytes
        too_large = PayloadTooLarge(f"the request body is larger than {limit} bytes", code="request_too_large")
        length = content_length(scope)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return (too_large if length.isdigit() else InvalidRequest("Content-Length is not a number")), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large, receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay
