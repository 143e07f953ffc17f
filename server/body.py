"""Request bodies: JSON parsed with bounded cost, cheap size checks, then strict validation into the route's model.

The body's size is already bounded by the request gate (server/gate.py). Parsing cost is bounded further: a
request holds at most a few numbers with a fraction or exponent (the sampling parameters), so a body with more
than MAX_FRACTIONAL_NUMBERS is refused at the one past the limit, before the rest is parsed — a megabyte list
of floats costs microseconds, not the seconds union validation of every item would. Token-id lists are checked
for length before their items are validated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from server.errors import InvalidRequest

MAX_FRACTIONAL_NUMBERS = 256


Model = TypeVar("Model", bound=BaseModel)


class FractionalNumbers:
    """json.loads' parse_float: counts numbers with a fraction or exponent and refuses non-finite ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def __call__(self, text: str) -> float:
        self.seen += 1
        if self.seen > self.limit:
            raise InvalidRequest(f"the body holds more than {self.limit} non-integer numbers; no request needs so many")
        value = float(text)
        if not math.isfinite(value):
            raise InvalidRequest(f"the number {text[:40]} is out of range")
        return value


def refuse_constant(name: str) -> float:
    raise InvalidRequest(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """The body as Python values. Bytes that are not UTF-8 become lone surrogates (surrogateescape), which the
    text fields refuse, so the error names the field that holds them."""
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        return json.loads(text, parse_float=FractionalNumbers(MAX_FRACTIONAL_NUMBERS), parse_constant=refuse_constant)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno} (character {error.pos})"
        raise InvalidRequest(f"the body is not valid JSON: {error.msg} at {where}") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise InvalidRequest(f"the body holds a number that cannot be read: {error}") from None


def validation_error(error: ValidationError) -> InvalidRequest:
    """The first problem of a validation error, as a 400 naming the field: ('stop', 2) -> param 'stop'."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if not isinstance(part, int)]
    param = location[0] if location else None
    path = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid request")
    return InvalidRequest(f"{path}: {message}" if path else message, param=param)


def json_body(model: type[Model]) -> Callable[[Request], Awaitable[Model]]:
    """A dependency that reads the body as `model`: JSON, then the model's cheap `check_sizes(data, settings)`
    if it has one, then strict validation (no strings or booleans taken for numbers, nor numbers for booleans)."""

    async def parse(request: Request) -> Model:
        data = parse_json(await request.body())
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a JSON object")
        check_sizes = getattr(model, "check_sizes", None)
        if check_sizes is not None:
            check_sizes(data, request.app.state.server.settings)
        try:
            return model.model_validate(data, strict=True)
        except ValidationError as error:
            raise validation_error(error) from None

    return parse
