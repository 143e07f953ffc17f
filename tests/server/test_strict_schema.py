"""Strict schemas (server/strict_schema.py): objects that list their properties allow no others, except where
properties combine across schemas, which stay as written so that valid schemas stay satisfiable."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model.grammar import GrammarSpec, compile_grammar, masks
from server.strict_schema import closed, strict_schema_text


def test_objects_that_list_their_properties_are_closed_wherever_they_are() -> None:
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "any": {"type": "object"},
            "list": {"type": "array", "items": {"properties": {"b": {}}}},
            "choice": {"anyOf": [{"properties": {"c": {}}}, {"type": "null"}]},
            "data": {"enum": [{"properties": {"d": 1}}]},
        },
        "$defs": {"thing": {"properties": {"e": {}}}},
    }
    result = closed(schema)
    assert result["additionalProperties"] is False
    props = result["properties"]
    assert props["inner"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in props["any"]  # any object stays any object
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["choice"]["anyOf"][0]["additionalProperties"] is False  # its parent lists no properties
    assert props["data"] == schema["properties"]["data"]  # data, not a schema
    assert result["$defs"]["thing"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's own schema is left as it was


COMBINED = {
    "anyOf branches beside properties": {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}},
        "required": ["kind"],
        "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]}, {"properties": {"y": {}}}],
    },
    "allOf of a definition and own properties": {
        "$defs": {"base": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
        "allOf": [{"$ref": "#/$defs/base"}],
        "properties": {"name": {"enum": ["n"]}},
        "required": ["name"],
    },
    "a reference beside properties": {
        "$defs": {"base": {"type": "object", "properties": {"id": {"enum": [1]}}, "required": ["id"]}},
        "$ref": "#/$defs/base",
        "properties": {"name": {"enum": ["n"]}},
        "required": ["name"],
    },
}
INSTANCES = {
    "anyOf branches beside properties": {"kind": "a", "x": 3},
    "allOf of a definition and own properties": {"id": 4, "name": "n"},
    "a reference beside properties": {"id": 1, "name": "n"},
}


@pytest.mark.parametrize("name", list(COMBINED))
def test_properties_that_combine_across_schemas_stay_satisfiable(name: str) -> None:
    schema = COMBINED[name]
    strict = closed(schema)
    jsonschema.validate(INSTANCES[name], strict)  # closing refused none of the combined properties
    matcher = compile_grammar(GrammarSpec("json_schema", json.dumps(strict))).matcher()
    for byte in json.dumps(INSTANCES[name], separators=(",", ":")).encode():
        masks([matcher])
        matcher.consume(byte)  # raises where the strict grammar refuses the instance
    assert matcher.error is None


def test_deep_schemas_fail_as_recursion_and_bad_text_as_value_errors() -> None:
    deep: object = {}
    for _ in range(5000):
        deep = {"items": deep}
    with pytest.raises(RecursionError):
        closed(deep)
    with pytest.raises(ValueError):
        strict_schema_text("1" * 5000)  # an integer too long for json to read
