"""Request bodies: JSON parsed with bounded cost, cheap size checks, then strict validation into the route's model.

The body's size is already bounded by the request gate (server/gate.py). Parsing cost is bounded further: a
request holds at most a few numbers with a fraction or exponent (the sampling parameters), so a body with more
than MAX_FRACTIONAL_NUMBERS is refused at the one past the limit, before the rest is parsed — a megabyte list
of floats costs microseconds, not the seconds union validation of every item would. Token-id lists are checked
for length before their items are validated.
"""

from __future__ import annotations

import functools
import json
import math
import re
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from server.errors import InvalidRequest
from server.gate import endpoint_label

MAX_FRACTIONAL_NUMBERS = 320  # a full logit_bias of fractional values (256) and the sampling parameters


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


MAX_NAMED_FIELDS = 16  # unknown fields named in the response header, at most


def unknown_fields(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """The keys of `data` that `model` does not declare (by name or alias), and those of its nested objects
    (`stream_options.x`). A field that holds one of several models is checked against the one its object names
    in `type` (`response_format`), else the one that declares most of the object's keys."""
    fields = declared(model)
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(prefix + key)
            continue
        nested = nested_models(model, key)
        if not nested:  # a plain value, or a list of them (a million token ids are never walked)
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for number, item in items:
            if isinstance(item, dict):
                kind = nested[0] if len(nested) == 1 else best_fit(nested, item)
                where = f"{prefix}{key}." if number is None else f"{prefix}{key}[{number}]."
                found += unknown_fields(item, kind, where)
    return found


@functools.cache
def declared(model: type[BaseModel]) -> frozenset[str]:
    """The names a body uses for the model's fields: their alias where they have one."""
    return frozenset(field.alias or name for name, field in model.model_fields.items())


@functools.cache
def nested_models(model: type[BaseModel], key: str) -> tuple[type[BaseModel], ...]:
    """The models the field `key` (a name or alias) holds, alone or in a list, through unions and Annotated."""
    field = next(field for name, field in model.model_fields.items() if (field.alias or name) == key)
    return tuple(_models_in(field.annotation))


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [kind for arg in typing.get_args(annotation) for kind in _models_in(arg)]


def best_fit(kinds: tuple[type[BaseModel], ...], item: dict[str, Any]) -> type[BaseModel]:
    """The model of a union an object is meant as: the one whose `type` is the object's, else the one that
    declares most of its keys."""
    for kind in kinds:
        tag = kind.model_fields.get("type")
        if tag is not None and item.get("type") in typing.get_args(tag.annotation):
            return kind
    return max(kinds, key=lambda kind: sum(key in declared(kind) for key in item))


PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\[\]-]{1,64}")


def quoted(name: str) -> str:
    return json.dumps(name[:64])[:80].rstrip()


def header_names(names: list[str]) -> str:
    """Unknown field names as a header value, at most MAX_NAMED_FIELDS: a plain name as it is, any other
    (empty, spaces, control or non-ASCII characters, long) as a JSON string in ASCII, cut short; a header
    value may not hold control characters nor start or end with a space."""
    shown = [name if PLAIN_NAME.fullmatch(name) else quoted(name) for name in names[:MAX_NAMED_FIELDS]]
    more = len(names) - MAX_NAMED_FIELDS
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "")  # at most about 1.3 kB


def check_unknown_fields(request: Request, data: dict[str, Any], model: type[BaseModel]) -> None:
    """Fields the API does not declare: ignored, named in the `x-windowlm-ignored-fields` response header and
    counted; or, when the server runs with `reject_unknown_fields`, a 400 naming the first."""
    names = unknown_fields(data, model)
    if not names:
        return
    state = request.app.state.server
    if state.settings.reject_unknown_fields:
        raise InvalidRequest(f"unknown field {names[0]!r}: this server refuses fields it does not know", param=names[0])
    request.state.ignored_fields = header_names(names)  # the request gate puts it in the response's header
    state.metrics.unknown_fields(endpoint_label(request.url.path))


def json_body(model: type[Model]) -> Callable[[Request], Awaitable[Model]]:
    """A dependency that reads the body as `model`: JSON, then the model's cheap `check_sizes(data, settings)`
    if it has one, then strict validation (no strings or booleans taken for numbers, nor numbers for booleans).
    Fields the model does not declare are ignored; see `check_unknown_fields`."""

    async def parse(request: Request) -> Model:
        data = parse_json(await request.body())
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a JSON object")
        check_unknown_fields(request, data, model)
        check_sizes = getattr(model, "check_sizes", None)
        if check_sizes is not None:
            check_sizes(data, request.app.state.server.settings)
        try:
            return model.model_validate(data, strict=True)
        except ValidationError as error:
            raise validation_error(error) from None

    return parse
