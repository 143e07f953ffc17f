"""`windowlm serve`: settings from the environment and flags, uvicorn, and a graceful drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from server.app import create_app, drain
from server.config import Settings
from server.state import ServerState
from weights.io import CheckpointError, read_config

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
    """uvicorn, except that SIGTERM first drains: /ready turns 503, new requests get 503, streams in flight
    run to their end (for at most the drain timeout), and then the server exits with status 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.drain_task is not None:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_running_loop()
        loop.call_soon_threadsafe(self.start_drain)

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
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.server)
    print(f"windowlm: serving {settings.served_model_name()} at http://{settings.host}:{settings.port}", flush=True)
    server.run()
    return 0
