"""A bare asyncio HTTP/1.1 client for the soak's streams: request, head, de-chunked body, SSE data, what came."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


def http_request(port: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def body_parts(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives, de-chunked; IncompleteReadError when it breaks off."""
    if headers.get("transfer-encoding", "").lower() != "chunked":
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def sse_data(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[str]:
    """The data fields of a stream's events in order; comments (pings) are skipped."""
    pending = b""
    async for part in body_parts(reader, headers):
        *events, pending = (pending + part).split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode("utf-8")


@dataclass
class Received:
    """What one stream delivered, per choice."""

    texts: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    logprob_tokens: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    finished: set[int] = field(default_factory=set)
    usage: int | None = None
    error: bool = False

    def add(self, payload: dict) -> None:
        if "error" in payload:  # the server gave up on the stream: the event is followed by [DONE]
            self.error = True
            return
        if payload.get("usage"):
            self.usage = payload["usage"]["completion_tokens"]
        for choice in payload["choices"]:
            self.texts[choice["index"]].append(choice["text"])
            if choice.get("logprobs"):
                self.logprob_tokens[choice["index"]] += len(choice["logprobs"]["tokens"])
            if choice.get("finish_reason"):
                self.finished.add(choice["index"])

    def token_bounds(self, with_logprobs: bool) -> tuple[int, int]:
        """Fewest and most tokens the stream can have carried. One token is one byte, so a text re-encodes to its
        tokens exactly, except that each U+FFFD stands for 1-3 bytes of invalid UTF-8 (or a real U+FFFD): with
        logprobs the count is exact, without them each U+FFFD widens the bounds by 2."""
        if with_logprobs:
            count = sum(self.logprob_tokens.values())
            return count, count
        texts = ["".join(parts) for parts in self.texts.values()]
        most = sum(len(text.encode("utf-8")) for text in texts)
        return most - 2 * sum(text.count("\ufffd") for text in texts), most
