"""The FastAPI application: create_app wires settings, routes, error handling and metrics.

The model is not the app's: `windowlm serve` loads it on the main thread while the HTTP server already answers
(/health 200, /ready 503 until the engine runs), then hands the engine to the app's state. The lifespan stops
the engine when the HTTP server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.engine import Engine
from server.errors import Unavailable, error_response, install_error_handlers
from server.metrics import Metrics
from server.routes import completions, health, models, tokens
from server.state import ServerState
from weights.io import load_checkpoint

logger = logging.getLogger("windowlm.server")

ENDPOINTS = {"/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/ready", "/metrics"}
ALWAYS_OPEN = {"/health", "/ready", "/metrics"}  # answered while draining


def load_engine(settings: Settings, metrics: Metrics) -> Engine:
    """Load the checkpoint the settings name and build its engine (not yet running)."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    model, _ = load_checkpoint(settings.weights, device=device, dtype=dtype)
    logger.info("loaded %s from %s on %s (%s)", settings.served_model_name(), settings.weights, device, dtype)
    return Engine(
        model,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        metrics=metrics,
        prefill_chunk=settings.prefill_chunk,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    try:
        yield
    finally:
        state.draining = True
        if state.engine is not None:
            state.engine.stop()


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint and status; refuses new work with 503 while draining."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.state.draining and path not in ALWAYS_OPEN:
                await error_response(Unavailable("the server is shutting down"))(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if status in (400, 422):
                self.state.metrics.request_failures.labels(reason="validation").inc()


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    state = ServerState(settings=settings, metrics=Metrics() if metrics is None else metrics)
    app = FastAPI(title="windowlm", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    for router in (completions.router, models.router, tokens.router, health.router):
        app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, state=state)
    return app


async def drain(state: ServerState, timeout: float) -> None:
    """Stop taking requests, let the ones in flight finish for up to `timeout` seconds, then fail the rest."""
    state.draining = True
    engine = state.engine
    if engine is None:
        return
    engine.accepting = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.busy and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if engine.busy:
        logger.warning("drain timeout of %.0f s passed: ending the streams still running", timeout)
        engine.abort_all("the server shut down before this request finished")
        await asyncio.sleep(0.2)  # let the error events reach their streams
