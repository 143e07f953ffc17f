"""`windowlm serve`: settings, uvicorn on a thread, the engine on the main thread, and a drain on SIGTERM.

The engine runs on the main thread because torch's CPU thread pool is several times faster there; uvicorn
runs its event loop on a second thread, and the signal handlers (which Python runs on the main thread) reach
it through that loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from server.app import create_app, drain, load_engine
from server.config import Settings
from server.state import ServerState
from weights.io import CheckpointError, read_config

logger = logging.getLogger("windowlm.server")

SETTING_FLAGS = (
    "weights",
    "model_name",
    "host",
    "port",
    "device",
    "dtype",
    "max_batch_size",
    "max_queue",
    "max_n",
    "prefill_chunk",
    "api_key",
    "drain_timeout",
    "ping_interval",
    "log_level",
)


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


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        read_config(settings.weights)  # a wrong folder fails here, at once, not after the server started
    except ValidationError as error:
        print(f"windowlm serve: invalid setting: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"windowlm serve: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")

    app = create_app(settings)
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, state)
    http = threading.Thread(target=server.run, name="windowlm-http")

    def on_signal(number: int, frame: FrameType | None) -> None:
        if number == signal.SIGTERM:
            server.request_drain()
        else:
            server.should_exit = True
            if state.engine is not None:
                state.engine.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http.start()
    print(f"windowlm: serving {settings.served_model_name()} at http://{settings.host}:{settings.port}", flush=True)
    try:
        state.engine = load_engine(settings, state.metrics)
    except Exception as error:
        logger.exception("could not load %s", settings.weights)
        state.load_error = f"{type(error).__name__}: {error}"
        server.should_exit = True
        http.join()
        return 1
    if not server.should_exit:
        state.engine.run_forever()
    http.join()
    return 0
