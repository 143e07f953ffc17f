"""What the routes share: settings, metrics, the engine once loaded, and the server's lifecycle flags."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from model.chat_template import ChatTemplate
from server.config import Settings
from server.constraints import GrammarCompiler
from server.engine import Engine
from server.errors import Unavailable
from server.metrics import Metrics


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    api_key_digests: list[bytes] = field(default_factory=list)  # SHA-256 of each API key; empty: no key needed
    engine: Engine | None = None
    load_error: str | None = None
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    chat_template: ChatTemplate = field(default_factory=ChatTemplate.default)
    grammars: GrammarCompiler | None = None  # made at the first constraint fields, by grammar_compiler()

    def grammar_compiler(self) -> GrammarCompiler:
        if self.grammars is None:
            self.grammars = GrammarCompiler(self.settings, self.metrics)
        return self.grammars

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


def get_engine(state: StateDep) -> Engine:
    return state.running_engine()


EngineDep = Annotated[Engine, Depends(get_engine)]
