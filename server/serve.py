"""`windowlm serve`: settings, uvicorn on a thread, the engine on the main thread, and a drain on SIGTERM.

The engine runs on the main thread because torch's CPU thread pool is several times faster there; uvicorn
runs its event loop on a second thread, and the signal handlers (which Python runs on the main thread) reach
it through that loop.

Start-up fails loudly: bad settings, an unreadable checkpoint or key file, or a port in use end the process
with one line on stderr and exit status 2 before anything is served. An engine loop that dies ends the process
with status 1 once its clients have been told, so the orchestrator restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import LOGGING_CONFIG

from model.chat_template import ChatTemplate, ChatTemplateError
from model.threads import configure_threads
from server.app import create_app, drain, load_engine
from server.chat_templates import server_chat_template
from server.config import Settings, settings_from
from server.gate import request_id
from server.http_protocol import GuardedH11Protocol, HttpLimits
from server.state import ServerState
from weights.io import CheckpointError, read_config

logger = logging.getLogger("windowlm.server")

ENGINE_FAILURE_EXIT = 1
STARTUP_FAILURE_EXIT = 2


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain: /ready turns 503, new requests get 503, streams in flight run to their end (for
    at most the drain timeout), then the server exits."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_drain(self) -> None:
        """Begin the drain (callable from any thread); a second request exits at once."""
        if self.loop is None or self.drain_task is not None:
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(self.start_drain)

    def start_drain(self) -> None:
        async def drain_then_exit() -> None:
            await drain(self.state, self.state.settings.drain_timeout)
            self.should_exit = True

        self.drain_task = asyncio.ensure_future(drain_then_exit())


class HideQueryStrings(logging.Filter):
    """Access log lines without query strings: a client may put a secret there, and no route reads one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            path, question, _ = record.args[2].partition("?")
            record.args = (*record.args[:2], path + ("?…" if question else ""), *record.args[3:])
        return True


class TagRequestIds(logging.Filter):
    """Gives each access log record the id the client got in `x-request-id` (`-` outside a request): uvicorn
    logs the line inside the request gate's `send`, where the gate's context variable holds the id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration, with ` request_id=ID` at the end of every access line (uvicorn's
    access formatter builds the line from the record's five arguments, so the id goes in through the format)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["access"]["fmt"] += " request_id=%(request_id)s"
    config.setdefault("filters", {})["request_id"] = {"()": TagRequestIds}
    config["handlers"]["access"]["filters"] = ["request_id"]
    return config


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind the server's socket here, on the main thread, so a port in use fails start-up at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def startup_settings(args: argparse.Namespace) -> tuple[Settings, list[bytes], ChatTemplate]:
    """Settings, API key digests and the chat template, or SystemExit with one line naming what is wrong."""
    try:
        settings = settings_from(args)
        read_config(settings.weights)  # a wrong folder fails here, at once, not after the server started
        template = server_chat_template(settings, settings.weights)
        return settings, settings.api_key_digests(), template
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"windowlm serve: invalid setting: {problems}") from None
    except (CheckpointError, ChatTemplateError) as error:
        raise SystemExit(f"windowlm serve: {error}") from None
    except (OSError, ValueError) as error:
        raise SystemExit(f"windowlm serve: cannot read the API keys: {error}") from None


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings, key_digests, chat_template = startup_settings(args)
        sock = listening_socket(settings.host, settings.port)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return STARTUP_FAILURE_EXIT
    except OSError as error:
        print(f"windowlm serve: cannot listen on {settings.host}:{settings.port}: {error.strerror}", file=sys.stderr)
        return STARTUP_FAILURE_EXIT
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")
    configure_threads(settings.threads)  # on this thread, which runs the engine
    logging.getLogger("uvicorn.access").addFilter(HideQueryStrings())

    app = create_app(settings, api_key_digests=key_digests, chat_template=chat_template)
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(),
        http=functools.partial(GuardedH11Protocol, limits=HttpLimits.from_settings(settings)),
        timeout_keep_alive=settings.keepalive_timeout,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, state)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="windowlm-http")

    def on_signal(number: int, frame: FrameType | None) -> None:
        if number == signal.SIGTERM:
            server.request_drain()
        else:
            server.should_exit = True
            if state.engine is not None:
                state.engine.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http.start()
    port = sock.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    playground = f"; the playground at {url}/" if settings.playground else ""
    print(f"windowlm: serving {settings.served_model_name()} at {url}{playground}", flush=True)
    try:
        state.engine = load_engine(settings, state.metrics)
    except Exception as error:
        logger.exception("could not load %s", settings.weights)
        state.load_error = f"{type(error).__name__}: {error}"
        server.should_exit = True
        http.join()
        return ENGINE_FAILURE_EXIT
    if not server.should_exit:
        state.engine.run_forever()
    if state.engine.failure is not None:
        exit_after_engine_failure(server, http)
    http.join()
    return 0


def exit_after_engine_failure(server: DrainingServer, http: threading.Thread) -> None:
    """The engine loop died: give the error events a moment to reach their clients, then leave with status 1
    whatever the HTTP thread is doing, so a supervisor restarts the process."""
    logger.critical("the engine loop died; exiting so the process can be restarted")
    time.sleep(0.5)
    server.should_exit = True
    http.join(2.0)
    logging.shutdown()
    os._exit(ENGINE_FAILURE_EXIT)
