"""The request fields that constrain the generated text, and the one constraint a request asks for.

- `response_format`, as OpenAI defines it: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON
  object), `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
- `structured_outputs`, under the names vLLM uses, so that clients written for it work unchanged: `json` (a
  schema, as an object or serialised), `regex`, `choice` (a list of strings), `grammar` (Lark, llguidance's
  syntax; a GBNF grammar is converted), `json_object: true`. vLLM's older top-level names `guided_json`,
  `guided_regex`, `guided_choice` and `guided_grammar` mean the same.

A request names at most one constraint. The JSON is written compact (no spaces or newlines between tokens).

Schemas are strict by default, as OpenAI's strict mode and vLLM's default backend have them: an object schema
that lists its `properties` allows no others unless it says so (`additionalProperties`, `patternProperties` or
`unevaluatedProperties`). Otherwise a model could write keys of its own forever. `"strict": false` in
`response_format.json_schema` keeps JSON Schema's own default (other properties allowed).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from model.grammar import GrammarError, GrammarSpec
from server.errors import InvalidRequest
from server.fields import STRICT, Text

ANY_OBJECT = '{"type": "object"}'
SchemaName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    model_config = {**STRICT, "populate_by_name": True}
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

    def grammar_spec(self) -> tuple[GrammarSpec, str] | None:
        """(the constraint, the field that asked for it), or None; 400 if the request names more than one."""
        found = [found for found in self._constraints() if found is not None]
        if len(found) > 1:
            names = ", ".join(param for _, param in found)
            message = f"a request takes one constraint, this one has {len(found)}: {names}"
            raise InvalidRequest(message, param=found[1][1])
        return found[0] if found else None

    def _constraints(self) -> list[tuple[GrammarSpec, str] | None]:
        given = self.structured_outputs or StructuredOutputs()
        return [
            _response_format(self.response_format),
            _schema(given.json_, "structured_outputs.json"),
            _text("regex", given.regex, "structured_outputs.regex"),
            _choice(given.choice, "structured_outputs.choice"),
            _text("grammar", given.grammar, "structured_outputs.grammar"),
            (GrammarSpec("json_schema", ANY_OBJECT), "structured_outputs.json_object") if given.json_object else None,
            _schema(self.guided_json, "guided_json"),
            _text("regex", self.guided_regex, "guided_regex"),
            _choice(self.guided_choice, "guided_choice"),
            _text("grammar", self.guided_grammar, "guided_grammar"),
        ]


def _response_format(given: ResponseFormat | None) -> tuple[GrammarSpec, str] | None:
    if given is None or given.type == "text":
        return None
    if given.type == "json_object" or given.json_schema.schema_ is None:
        return GrammarSpec("json_schema", ANY_OBJECT), "response_format"
    strict = given.json_schema.strict is not False
    return _schema(given.json_schema.schema_, "response_format.json_schema.schema", strict)


def _schema(
    schema: dict[str, Any] | bool | str | None, param: str, strict: bool = True
) -> tuple[GrammarSpec, str] | None:
    """The schema (an object, or one serialised) as a spec, closed when strict; 400 if it is not JSON."""
    if schema is None:
        return None
    try:
        parsed = json.loads(schema) if isinstance(schema, str) else schema
        return GrammarSpec("json_schema", json.dumps(closed(parsed) if strict else parsed)), param
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"{param}: the schema is not JSON: {error}", param=param) from None
    except RecursionError:
        raise InvalidRequest(f"{param}: the schema is nested too deeply", param=param) from None


def _text(kind: Literal["regex", "grammar"], text: str | None, param: str) -> tuple[GrammarSpec, str] | None:
    return None if text is None else (GrammarSpec(kind, text), param)


def _choice(choices: list[str] | None, param: str) -> tuple[GrammarSpec, str] | None:
    return None if choices is None else (GrammarSpec("choice", json.dumps(choices)), param)


def strict_schema(text: str) -> str:
    """A serialised schema, closed (see `closed`); GrammarError if it is not JSON or nested too deeply."""
    try:
        return json.dumps(closed(json.loads(text)))
    except (json.JSONDecodeError, RecursionError) as error:
        raise GrammarError(f"the schema cannot be read: {error}") from None


_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_SUBSCHEMA += ("additionalProperties", "unevaluatedProperties")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")  # not allOf: closing its parts would make them exclusive


def closed(schema: object) -> object:
    """A copy of the schema in which every object schema that lists `properties` and says nothing of other
    properties allows none (see the module docstring). Values of enum, const, default and examples are data,
    never walked."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    if isinstance(schema.get("properties"), dict) and not any(key in schema for key in _OPEN_KEYWORDS):
        result["additionalProperties"] = False
    for key in _SUBSCHEMA:
        if key in schema:
            result[key] = closed(schema[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            result[key] = {name: closed(sub) for name, sub in schema[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            result[key] = [closed(sub) for sub in schema[key]]
    return result
