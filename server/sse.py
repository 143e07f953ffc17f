"""Server-Sent Events: framing, and a streaming response that notices a client leaving at once."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("windowlm.server")

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}
DONE = "data: [DONE]\n\n"
PING = ": ping\n\n"


def sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that stops its body the moment the client disconnects.

    The body runs beside a listener for `http.disconnect`: when the client goes, the body's generator is
    cancelled at its next await, even while it waits for tokens (a queued request, a slow step). A write the
    client does not take within `send_timeout` seconds (it stopped reading, and the socket's buffers are full)
    ends the response too, and uvicorn closes the connection.
    """

    def __init__(
        self, content, on_close: Callable[[], None] | None = None, send_timeout: float = 120.0, **kwargs
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS, **kwargs)
        self.on_close = on_close
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def send_in_time(message: Message) -> None:
                    with anyio.fail_after(self.send_timeout):
                        await send(message)

                async def body() -> None:
                    try:
                        await self.stream_response(send_in_time)
                    except OSError:  # the client went away while we were writing
                        pass
                    except TimeoutError:
                        logger.warning("closing a stream whose client took nothing for %g s", self.send_timeout)
                    group.cancel_scope.cancel()

                group.start_soon(body)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            if self.on_close is not None:  # also when the body never started: a generator not yet entered
                self.on_close()  # runs no `finally` of its own
