"""Client errors as exceptions, and the one place that maps them to OpenAI-style JSON error bodies."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error the client should see: an HTTP status and an OpenAI error object."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(APIError):
    status_code = 404
    error_type = "not_found_error"


class Overloaded(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    retry_after_seconds = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class Unavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError, *, headers: dict[str, str] | None = None, close: bool = False) -> JSONResponse:
    """The JSON response of an error; `close` ends the connection after it (the request body was not read)."""
    headers = {**error.headers(), **(headers or {})}
    if close:
        headers["Connection"] = "close"
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        parts = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = parts[0] if parts else None
        message = first.get("msg", "invalid request")
        return error_response(InvalidRequest(f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (404 for an unknown path, 405 with its Allow header) in the OpenAI shape."""
        kind = {404: NotFound, 401: Unauthorized}.get(error.status_code, InvalidRequest)
        response = error_response(kind(str(error.detail)), headers=dict(error.headers or {}))
        response.status_code = error.status_code
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(f"internal error: {type(error).__name__}"))
