"""The OpenAPI document, made to tell the truth: every status a route can answer, the error body, the request
bodies (parsed by server/body.py rather than by FastAPI) and the streaming and Prometheus content types."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

STATUS_TEXT = {
    400: "Invalid request: the message names the problem and `param` the field, where there is one",
    401: "No valid API key (`Authorization: Bearer KEY`); carries `WWW-Authenticate: Bearer`",
    404: "No such model",
    405: "Method not allowed; `Allow` lists the methods",
    413: "The request body is larger than the server's limit",
    429: "Every slot and the waiting queue are full; retry after `Retry-After` seconds",
    431: "The request head is too large or has too many header fields",
    500: "An internal error, reported as such",
    503: "The model is loading, the server is draining, or the engine has stopped",
}
EVERY_ROUTE = (405, 413, 431, 500, 503)  # answered before (or whatever) the route does


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorObject


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route for the errors only it answers."""
    return {code: {"model": ErrorResponse, "description": STATUS_TEXT[code]} for code in codes}


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra=` of a route whose body is `model`, read by server.body.json_body."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi_document(
    app: FastAPI, request_models: list[type[BaseModel]], model_name: str, open_paths: set[str] | None
) -> dict[str, Any]:
    """The document; `open_paths` are the paths that need no API key, or None when the server has no keys."""
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in [*request_models, ErrorResponse]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        if "model" in schema.get("properties", {}):  # the id this server answers to
            schema["properties"]["model"]["examples"] = [model_name]
        schemas[model.__name__] = schema
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    if open_paths is not None:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in document["paths"].items():
        protected = open_paths is not None and path not in open_paths
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code in (401, *EVERY_ROUTE) if protected else EVERY_ROUTE:
                responses.setdefault(str(code), {"description": STATUS_TEXT[code], "content": error})
            if protected:
                operation["security"] = [{"apiKey": []}]
    return document


def install_openapi(
    app: FastAPI, request_models: list[type[BaseModel]], model_name: str, open_paths: set[str] | None
) -> None:
    """Make `app.openapi()` return the document above (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, request_models, model_name, open_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
