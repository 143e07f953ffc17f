"""Liveness, readiness and Prometheus metrics; each answers HEAD as it answers GET, without the body (uvicorn
drops it), for probes and monitors that send HEAD. HEAD is left out of the OpenAPI document."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.state import StateDep

router = APIRouter()


@router.head("/health", include_in_schema=False)
@router.get("/health")
def health(state: StateDep) -> JSONResponse:
    """200 while the process and the engine loop are alive (also while loading); 503 once either has failed."""
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "reason": state.load_error}, status_code=503)
    if state.engine is not None and not state.engine.alive:
        return JSONResponse({"status": "failed", "reason": "the engine loop has stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.head("/ready", include_in_schema=False)
@router.get("/ready")
def ready(state: StateDep) -> JSONResponse:
    """200 when requests can be served; 503 while loading weights, while draining, or after a failure."""
    if state.ready:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "loading" if state.engine is None and not state.load_error else "failed"
    return JSONResponse({"status": reason}, status_code=503)


PROMETHEUS_TEXT = {
    200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
}


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
