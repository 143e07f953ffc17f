"""The request fields that constrain the generated text, and the one constraint a request asks for.

- `response_format`, as OpenAI defines it: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON
  object), `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
- `structured_outputs`, under the names vLLM uses, so that clients written for it work unchanged: `json` (a
  schema, as an object or serialised), `regex`, `choice` (a list of strings), `grammar` (Lark, llguidance's
  syntax; a GBNF grammar is converted), `json_object: true`. vLLM's older top-level names `guided_json`,
  `guided_regex`, `guided_choice` and `guided_grammar` mean the same.

A request names at most one constraint. The JSON is written compact (no spaces or newlines between tokens).

Schemas are strict (server/strict_schema.py) unless `response_format.json_schema` says `"strict": false`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from model.grammar import GrammarKind, GrammarSpec
from server.errors import InvalidRequest
from server.fields import STRICT, Text
from server.strict_schema import closed, schema_size

ANY_OBJECT = '{"type": "object"}'
SchemaName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    model_config = STRICT
    name: SchemaName
    description: Text | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="a JSON Schema; absent: any object")
    strict: bool | None = Field(None, description="the schema is always enforced exactly")


class JsonSchemaFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
Choices = Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=4096)]


class StructuredOutputs(BaseModel):
    model_config = STRICT
    json_: dict[str, Any] | bool | Text | None = Field(None, alias="json", description="a JSON Schema")
    regex: Text | None = Field(None, description="a regular expression the whole text matches (Rust regex syntax)")
    choice: Choices | None = Field(None, description="the text is one of these strings")
    grammar: Text | None = Field(None, description="a context-free grammar in Lark syntax (GBNF is converted)")
    json_object: bool | None = Field(None, description="true: any JSON object")


class ConstraintFields(BaseModel):
    """The constraint fields of completions and chat completions."""

    model_config = STRICT
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Choices | None = None
    guided_grammar: Text | None = None

    def grammar_spec(self, max_bytes: int) -> tuple[GrammarSpec, str] | None:
        """(the constraint, the field that asked for it), or None; 400 if the request names more than one, or one
        longer than `max_bytes` (measured before a schema is walked)."""
        found = [asked for asked in self._asked() if asked[1] is not None]
        if len(found) > 1:
            names = ", ".join(param for _, _, param, _ in found)
            message = f"a request takes one constraint, this one has {len(found)}: {names}"
            raise InvalidRequest(message, param=found[1][2])
        if not found:
            return None
        kind, value, param, strict = found[0]
        return _spec(kind, value, param, strict, max_bytes), param

    @property
    def constrained(self) -> bool:
        return any(value is not None for _, value, _, _ in self._asked())

    def _asked(self) -> list[tuple[GrammarKind, Any, str, bool]]:
        """(kind, the value given or None, its field, whether a schema is made strict) for every constraint field."""
        given = self.structured_outputs or StructuredOutputs()
        return [
            _response_format(self.response_format),
            ("json_schema", given.json_, "structured_outputs.json", True),
            ("regex", given.regex, "structured_outputs.regex", False),
            ("choice", given.choice, "structured_outputs.choice", False),
            ("grammar", given.grammar, "structured_outputs.grammar", False),
            ("json_schema", ANY_OBJECT if given.json_object else None, "structured_outputs.json_object", False),
            ("json_schema", self.guided_json, "guided_json", True),
            ("regex", self.guided_regex, "guided_regex", False),
            ("choice", self.guided_choice, "guided_choice", False),
            ("grammar", self.guided_grammar, "guided_grammar", False),
        ]


def _response_format(given: ResponseFormat | None) -> tuple[GrammarKind, Any, str, bool]:
    if given is None or given.type == "text":
        return "json_schema", None, "response_format", False
    if given.type == "json_object" or given.json_schema.schema_ is None:
        return "json_schema", ANY_OBJECT, "response_format", False
    strict = given.json_schema.strict is not False
    return "json_schema", given.json_schema.schema_, "response_format.json_schema.schema", strict


def _spec(kind: GrammarKind, value: Any, param: str, strict: bool, max_bytes: int) -> GrammarSpec:
    """The constraint as a spec within `max_bytes`: a schema serialised (strict when asked), choices as JSON."""
    try:
        size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else schema_size(value)
        if size > max_bytes:
            raise InvalidRequest(f"{param}: it is {size} bytes; this server compiles at most {max_bytes}", param=param)
        if kind == "choice":
            return GrammarSpec(kind, json.dumps(value))
        if kind != "json_schema":
            return GrammarSpec(kind, value)
        schema = json.loads(value) if isinstance(value, str) else value
        if schema is False:
            raise InvalidRequest(f"{param}: the schema false allows no value at all", param=param)
        schema = {} if schema is True else schema
        return GrammarSpec(kind, json.dumps(closed(schema) if strict else schema))
    except ValueError as error:  # json's errors, and an integer too long to read
        raise InvalidRequest(f"{param}: the schema is not JSON: {error}", param=param) from None
    except RecursionError:
        raise InvalidRequest(f"{param}: the schema is nested too deeply", param=param) from None
