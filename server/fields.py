"""Field types of the API's request bodies: text the tokenizer can encode, integers that take 2.0 as 2, and the
strict model configuration every request body uses."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field

STRICT = ConfigDict(extra="ignore", strict=True)  # unknown fields: see server/body.py


def valid_text(text: str) -> str:
    """Text the tokenizer can encode: no lone surrogates (which is also where bytes that were not UTF-8 end
    up), no NUL characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        problem = f"character {error.start} is a lone surrogate or an invalid byte"
        raise ValueError(f"must be valid UTF-8 text: {problem}") from None
    if "\x00" in text:
        raise ValueError(f"must not contain NUL characters (one at character {text.index(chr(0))})")
    return text


def integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer, so it is taken as 2; 2.5, "2" and true stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[str, AfterValidator(valid_text), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]


def integer(**bounds: int) -> Any:
    """An integer field within `bounds` (ge, lt, ...) that also takes integral floats such as 2.0."""
    return Annotated[int, Field(**bounds), BeforeValidator(integral)]
