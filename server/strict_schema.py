"""Strict JSON schemas: an object schema that lists its `properties` allows no others unless it says so.

This is what OpenAI's strict mode and vLLM's default backend do, and what a constraint needs: under JSON Schema's
own default (other properties allowed) a model that knows no JSON writes keys of its own forever. A schema says
otherwise with `additionalProperties`, `patternProperties` or `unevaluatedProperties`.

Where properties combine across schemas, closing one part would refuse the others' properties, so these stay as
written: an object schema that also has `$ref`, `allOf`, `anyOf`, `oneOf` or `if`; the `anyOf` / `oneOf`
branches of an object schema that lists properties; the branches of `allOf`; and the definitions a `$ref` names
from `allOf` or beside properties. Values of `enum`, `const`, `default` and `examples` are data, never walked.
"""

from __future__ import annotations

import json
from typing import Any

_OPEN = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_COMBINING = ("$ref", "allOf", "anyOf", "oneOf", "if")
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_SUBSCHEMA += ("additionalProperties", "unevaluatedProperties")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
_DEFINITIONS = ("$defs", "definitions")
_BRANCHES = ("anyOf", "oneOf")


def closed(schema: object) -> object:
    """A copy of the schema made strict (see the module docstring); the schema itself is not changed."""
    return _closed(schema, _shared_definitions(schema), keep_open=False)


def strict_schema_text(text: str) -> str:
    """A serialised schema made strict; ValueError (json's) or RecursionError if it cannot be read."""
    return json.dumps(closed(json.loads(text)))


def _closed(schema: object, shared: set[str], keep_open: bool) -> object:
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    lists = isinstance(schema.get("properties"), dict)
    combining = any(key in schema for key in _COMBINING)
    if lists and not keep_open and not combining and not any(key in schema for key in _OPEN):
        result["additionalProperties"] = False
    for key in _SUBSCHEMA:
        if key in schema:
            result[key] = _closed(schema[key], shared, keep_open=False)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            result[key] = {name: _closed(sub, shared, keep_open=False) for name, sub in schema[key].items()}
    for key in _DEFINITIONS:
        if isinstance(schema.get(key), dict):
            defined = schema[key].items()
            result[key] = {name: _closed(sub, shared, f"#/{key}/{name}" in shared) for name, sub in defined}
    for key in _BRANCHES:  # alternatives to the object's own properties combine with them
        if isinstance(schema.get(key), list):
            result[key] = [_closed(sub, shared, keep_open=lists) for sub in schema[key]]
    return result


def _shared_definitions(schema: object) -> set[str]:
    """The `$ref`s whose definitions combine with other properties: named by a branch of `allOf`, beside
    `properties`, or by an `anyOf` / `oneOf` branch of an object schema that lists properties."""
    shared: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("$ref"), str) and "properties" in node:
            shared.add(node["$ref"])
        branches = list(node.get("allOf", []) if isinstance(node.get("allOf"), list) else [])
        if "properties" in node:
            branches += [b for key in _BRANCHES if isinstance(node.get(key), list) for b in node[key]]
        shared.update(b["$ref"] for b in branches if isinstance(b, dict) and isinstance(b.get("$ref"), str))
        stack.extend(value for key, value in node.items() if key not in ("enum", "const", "default", "examples"))
    return shared


def schema_size(schema: Any) -> int:
    """Bytes of the schema as compact JSON (serialised in C, before any walk in Python)."""
    return len(json.dumps(schema, separators=(",", ":")).encode("utf-8", "surrogatepass"))
