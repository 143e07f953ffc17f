"""The two back ends of `windowlm chat`: a running server over HTTP, or a checkpoint on an engine in this process.

Both take the body of a streaming `POST /v1/chat/completions` and yield the answer's text as it comes; closing the
iterator (Ctrl+C) ends the answer: the HTTP back end closes its connection, which the server takes as the client
leaving, and the in-process back end cancels its engine request. The in-process back end runs the server's own
request checks, chat template and text code (`chat_spec`, `engine_requests`, `merge_choice_events`), so a greedy
request gives the same text on both. Failures are ChatErrors worded for the person at the terminal.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from pydantic import ValidationError

from model.chat_template import ChatTemplate
from model.threads import configure_threads
from model.transformer import LocalTransformer
from server.chat_templates import server_chat_template
from server.choices import ChoiceDelta, GenerationFailed, merge_choice_events
from server.config import Settings
from server.engine import Engine, EngineOverloaded, EngineStopped
from server.metrics import Metrics
from weights.io import load_checkpoint

if TYPE_CHECKING:
    from server.generation_run import GenerationRun

CONNECT_TIMEOUT = 10.0  # seconds to connect and to get the response head
READ_TIMEOUT = 300.0  # seconds without a byte from a stream (the server pings an idle one every 15 s by default)
START_HINT = "start one with `make serve` or `windowlm serve`, or chat without a server: `windowlm chat --weights DIR`"
KEY_HINT = "pass --api-key KEY (or set WINDOWLM_API_KEY)"


class ChatError(Exception):
    """A failure to show the person as it is: one line, the server's own words where it gave any."""


class ChatBackend(Protocol):
    model: str
    where: str  # the server's URL, or the checkpoint folder

    def stream(self, body: dict[str, Any]) -> Iterator[str]: ...

    def close(self) -> None: ...


class HttpChat:
    """A windowlm (or any OpenAI-compatible) server at `url`, through the standard library's HTTP client."""

    def __init__(self, url: str, api_key: str | None, model: str | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ChatError(f"--url must be an http:// or https:// address, got {url!r}")
        self.where = url
        self.parts = parts
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")  # the server's root, with or without /v1
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        listed = self.first_model()  # also shows at once that the server is there and takes the key
        self.model = model if model is not None else listed

    def first_model(self) -> str:
        """The first model `GET /v1/models` lists."""
        connection, response = self.open("GET", "/v1/models")
        try:
            listed = json.loads(response.read()).get("data") or []
        except (ValueError, AttributeError, OSError) as error:
            raise ChatError(f"the server at {self.where} answered /v1/models with no model list: {error}") from None
        finally:
            connection.close()
        if not listed or not isinstance(listed[0], dict) or not isinstance(listed[0].get("id"), str):
            raise ChatError(f"the server at {self.where} lists no model; name one with --model")
        return listed[0]["id"]

    def open(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """(connection, response) of a request that answered 200; any other answer is a ChatError."""
        kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(self.parts.hostname, self.parts.port, timeout=CONNECT_TIMEOUT)
        data = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, self.prefix + path, body=data, headers=self.headers)
            response = connection.getresponse()
            if response.status == 200:
                connection.sock.settimeout(READ_TIMEOUT)
                return connection, response
            message = status_message(response.status, response.reason, response.read())
        except ConnectionRefusedError:
            connection.close()
            raise ChatError(f"no server is running at {self.where}: {START_HINT}") from None
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ChatError(f"cannot talk to the server at {self.where}: {describe(error)}") from None
        connection.close()
        raise ChatError(message)

    def stream(self, body: dict[str, Any]) -> Iterator[str]:
        connection, response = self.open("POST", "/v1/chat/completions", body)
        try:
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as error:
                    raise ChatError(f"the stream from {self.where} broke off: {describe(error)}") from None
                if not line:
                    raise ChatError(f"the server at {self.where} closed the stream before its end")
                if not line.startswith(b"data:"):
                    continue  # blank lines between events, `: ping` comments
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                text = event_text(payload)
                if text:
                    yield text
        finally:
            connection.close()  # before the end (Ctrl+C): the server cancels the answer and frees its slot

    def close(self) -> None:
        pass


def status_message(status: int, reason: str, raw: bytes) -> str:
    """An error answer as the server words it: its body's `error.message`, else the status line."""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    if status == 401:
        return f"the server answered 401: {message or reason}; {KEY_HINT}"
    return message if isinstance(message, str) and message else f"the server answered {status} {reason}"


def event_text(payload: bytes) -> str:
    """The answer's text in one chunk of the stream; an error event is a ChatError with the server's message."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise ChatError(f"the server sent an event that is not JSON: {payload[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise ChatError(f"the server sent an event that is not an object: {payload[:80]!r}")
    if "error" in chunk:
        error = chunk["error"]
        raise ChatError(str(error.get("message") if isinstance(error, dict) else error))
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    content = delta.get("content")
    return content if isinstance(content, str) else ""


def describe(error: BaseException) -> str:
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "no answer in time"
    return str(error) or type(error).__name__


_END = object()


async def _next(deltas: AsyncIterator[list[ChoiceDelta] | None]) -> object:
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return _END


def load(weights: Path) -> tuple[Settings, ChatTemplate, LocalTransformer]:
    """The settings a server of this checkpoint would have (WINDOWLM_* variables), its chat template, its model."""
    try:
        settings = Settings(weights=weights)
        template = server_chat_template(settings, weights)
        model, _ = load_checkpoint(weights, device=settings.resolved_device(), dtype=settings.resolved_dtype())
    except ValidationError as error:
        first = error.errors()[0]
        raise ChatError(f"setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except (ValueError, OSError) as error:
        raise ChatError(str(error) or type(error).__name__) from None
    return settings, template, model


class InProcessChat:
    """A checkpoint on an engine of one slot in this process, with the settings a server would read from the
    WINDOWLM_* variables (device, dtype, chat template, --chat-max-tokens, limits).

    The engine runs on a thread of its own and this (main) thread drives an asyncio loop for each answer, so
    that Ctrl+C reaches the conversation, not the engine."""

    def __init__(self, weights: Path, threads: int | None) -> None:
        self.settings, self.template, model = load(weights)
        self.model = self.settings.served_model_name()
        self.where = str(weights)
        settings = self.settings
        self.engine = Engine(
            model,
            max_batch_size=1,
            max_queue=1,  # room for the next answer while a cut one still holds the slot for a step
            metrics=Metrics(self.model),
            prefill_chunk=settings.prefill_chunk,
            prompt_tokens_per_step=settings.prompt_tokens_per_step,
            read_whole_prompt=settings.read_whole_prompt,
        )
        chosen = threads if threads is not None else settings.threads
        self.thread = threading.Thread(target=self.run_engine, args=(chosen,), name="windowlm-chat-engine", daemon=True)
        self.thread.start()
        self.loop = asyncio.new_event_loop()

    def run_engine(self, threads: int | None) -> None:
        configure_threads(threads)  # on the thread whose steps use them
        self.engine.run_forever()

    def submit(self, body: dict[str, Any]) -> GenerationRun:
        """The body checked as the server checks it, queued in the engine."""
        # The server's request code, imported when first used: the command line's parser stays light.
        from server.body import validation_error
        from server.chat_protocol import ChatCompletionRequest
        from server.errors import InvalidRequest
        from server.generation_run import GenerationRun
        from server.routes.chat import chat_spec
        from server.submission import engine_requests

        try:
            ChatCompletionRequest.check_sizes(body, self.settings)
            try:
                request = ChatCompletionRequest.model_validate(body, strict=True)
            except ValidationError as error:
                raise validation_error(error) from None
            spec = chat_spec(request, self.template, self.settings)
            requests = engine_requests(spec, self.engine, self.settings, self.loop)
            self.engine.submit(requests)
        except InvalidRequest as error:
            raise ChatError(error.message) from None
        except (EngineOverloaded, EngineStopped) as error:
            raise ChatError(f"the engine cannot take the request: {error}") from None
        return GenerationRun(spec, requests)

    def stream(self, body: dict[str, Any]) -> Iterator[str]:
        while not self.engine.alive:  # the engine thread is still starting
            if self.engine.failure is not None or not self.thread.is_alive():
                raise ChatError(f"the engine failed: {self.engine.failure}")
            self.loop.run_until_complete(asyncio.sleep(0.001))
        run = self.submit(body)
        deltas = merge_choice_events(run.requests, run.choices, idle_seconds=3600)
        step = None
        try:
            while True:
                step = self.loop.create_task(_next(deltas))
                try:
                    batch = self.loop.run_until_complete(step)
                except GenerationFailed as error:
                    raise ChatError(str(error)) from None
                if batch is _END:
                    return
                for delta in batch or []:  # type: ignore[union-attr]
                    if delta.text:
                        yield delta.text
        finally:
            run.cancel()  # the engine frees the slot at its next step
            self.settle(step, deltas)

    def settle(self, step: asyncio.Task | None, deltas: AsyncIterator[list[ChoiceDelta] | None]) -> None:
        """After an interrupted answer: let the merge that was waiting for events end, and close it."""
        if step is not None and not step.done():
            step.cancel()
            self.loop.run_until_complete(asyncio.wait([step]))
        self.loop.run_until_complete(deltas.aclose())  # type: ignore[attr-defined]

    def close(self) -> None:
        self.engine.shutdown()
        self.thread.join(10)
        self.loop.close()
