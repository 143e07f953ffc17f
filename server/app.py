"""The FastAPI application: create_app wires settings, routes, error handling and metrics.

The model is not the app's: `windowlm serve` loads it on the main thread while the HTTP server already answers
(/health 200, /ready 503 until the engine runs), then hands the engine to the app's state. The lifespan stops
the engine when the HTTP server shuts down.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from model.chat_template import ChatTemplate
from server.chat_protocol import ChatCompletionRequest
from server.chat_templates import server_chat_template
from server.config import Settings
from server.engine import Engine
from server.errors import install_error_handlers
from server.faults import FaultInjector
from server.gate import RequestGate, open_without_key
from server.metrics import Metrics
from server.openapi import install_openapi
from server.protocol import CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.routes import chat, completions, health, models, playground, tokens
from server.state import ServerState
from server.thread_tuner import thread_tuner
from weights.io import load_checkpoint

logger = logging.getLogger("windowlm.server")


def load_engine(settings: Settings, metrics: Metrics) -> Engine:
    """Load the checkpoint the settings name and build its engine (not yet running)."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    model, _ = load_checkpoint(settings.weights, device=device, dtype=dtype)
    logger.info("loaded %s from %s on %s (%s)", settings.served_model_name(), settings.weights, device, dtype)
    metrics.torch_threads.set(torch.get_num_threads())
    engine = Engine(
        model,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        metrics=metrics,
        prefill_chunk=settings.prefill_chunk,
        prompt_tokens_per_step=settings.prompt_tokens_per_step,
        read_whole_prompt=settings.read_whole_prompt,
        stream_buffer=settings.stream_buffer,
        stall_timeout=settings.stall_timeout,
        faults=FaultInjector.from_environment(),
        # a compiled step is built for the threads there are now (a change would compile it again): fixed
        thread_tuner=thread_tuner(
            settings.threads is not None or settings.compile, functools.partial(set_threads, metrics)
        ),
    )
    if settings.compile:
        seconds = engine.runner.decoder.compile(progress=logger.info)
        logger.info("decode step compiled in %.1f s", seconds)
    return engine


def set_threads(metrics: Metrics, count: int) -> None:
    """torch's threads, as the thread tuner changes them, and the gauge that shows them."""
    torch.set_num_threads(count)
    metrics.torch_threads.set(count)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    try:
        yield
    finally:
        state.draining = True
        if state.engine is not None:
            state.engine.shutdown()
        if state.grammars is not None:
            state.grammars.shutdown()


def create_app(
    settings: Settings,
    metrics: Metrics | None = None,
    api_key_digests: list[bytes] | None = None,
    chat_template: ChatTemplate | None = None,
) -> FastAPI:
    """The app of `settings`; API keys and the chat template are those of the settings unless given."""
    digests = settings.api_key_digests() if api_key_digests is None else api_key_digests
    metrics = Metrics(settings.served_model_name()) if metrics is None else metrics
    state = ServerState(settings=settings, metrics=metrics, api_key_digests=digests)
    state.chat_template = server_chat_template(settings, settings.weights) if chat_template is None else chat_template
    app = FastAPI(title="windowlm", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    for router in (completions.router, chat.router, models.router, tokens.router, health.router):
        app.include_router(router)
    if settings.playground:
        app.include_router(playground.playground_router())
    app.add_middleware(RequestGate, state=state)
    open_paths = open_without_key(settings) if digests else None
    install_openapi(
        app,
        [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest],
        settings.served_model_name(),
        open_paths,
    )
    return app


async def drain(state: ServerState, timeout: float) -> None:
    """Stop taking requests, let the ones in flight finish for up to `timeout` seconds, then fail the rest."""
    state.draining = True
    engine = state.engine
    if engine is None:
        return
    engine.stop_accepting()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.busy and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if engine.busy:
        logger.warning("drain timeout of %.0f s passed: ending the streams still running", timeout)
        engine.abort_all("the server shut down before this request finished")
        await asyncio.sleep(0.2)  # let the error events reach their streams
