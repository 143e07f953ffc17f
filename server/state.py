"""What the routes share: settings, metrics, the engine once loaded, and the server's lifecycle flags."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.engine import Engine
from server.errors import Unauthorized, Unavailable
from server.metrics import Metrics


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    load_error: str | None = None
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    def running_engine(self) -> Engine:
        """The engine, or 503 while loading, draining or after a failure."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise Unavailable(message)
        if not self.engine.alive:
            raise Unavailable("the engine has stopped")
        return self.engine


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


def require_api_key(request: Request, state: StateDep) -> None:
    """With an API key configured, every API route needs `Authorization: Bearer KEY`."""
    expected = state.settings.api_key
    if expected is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")


def get_engine(state: StateDep) -> Engine:
    return state.running_engine()


EngineDep = Annotated[Engine, Depends(get_engine)]
