"""Constrained generation over HTTP with the bundled model, which knows no JSON: the constraint does all the work.
Every reply that ends with finish_reason "stop" is a complete text of its schema, pattern, grammar or choice; one
that max_tokens ends is a valid beginning of one; what the library refuses is a 400 naming the field."""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from model.grammar import GrammarSpec, compile_grammar
from tests.server.conftest import TEST_MODEL, ServerProcess

PROMPT = "ROMEO: Tell me, what is thy name?\nJULIET:"
WORD = {"type": "string", "maxLength": 10}
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "speaker": {
                "type": "object",
                "properties": {"name": WORD, "act": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "line": WORD,
        },
        "required": ["speaker", "line"],
        "additionalProperties": False,
    },
    "bounded array": {
        "type": "object",
        "properties": {"words": {"type": "array", "items": WORD, "minItems": 2, "maxItems": 4}},
        "required": ["words"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"mood": {"enum": ["glad", "sad", "wroth"]}, "house": {"enum": ["Montague", "Capulet", 7]}},
        "required": ["mood", "house"],
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 13, "maximum": 99},
            "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        },
        "required": ["age", "weight"],
    },
    "optional properties, no others": {
        "type": "object",
        "properties": {"name": WORD, "title": WORD, "rank": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["name"],
        "additionalProperties": False,
    },
    "string patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^1[56][0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        },
        "required": ["date", "code"],
        "additionalProperties": False,
    },
    "array of objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"who": WORD, "ok": {"type": "boolean"}},
            "required": ["who", "ok"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}
ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


def complete(server: ServerProcess, **fields) -> dict:
    body = {"model": TEST_MODEL, "prompt": PROMPT, "max_tokens": 200, **fields}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def json_schema_format(schema: dict | bool) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_finished_reply_validates_against_its_schema(bundled: ServerProcess, name: str) -> None:
    schema = SCHEMAS[name]
    greedy = complete(bundled, temperature=0, response_format=json_schema_format(schema))["choices"]
    sampled = complete(bundled, temperature=1.0, seed=11, n=4, response_format=json_schema_format(schema))["choices"]
    replies = greedy + sampled
    stopped = [choice["text"] for choice in replies if choice["finish_reason"] == "stop"]
    assert len(stopped) >= 3, replies  # bounded strings: most replies end within max_tokens
    for text in stopped:
        jsonschema.validate(json.loads(text), schema)


def test_strict_false_lets_an_object_hold_properties_its_schema_does_not_list(bundled: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"mood": {"enum": ["glad", "sad"]}}, "required": ["mood"]}
    strict_reply = complete(bundled, temperature=0, response_format=json_schema_format(schema))["choices"][0]
    assert strict_reply["finish_reason"] == "stop" and set(json.loads(strict_reply["text"])) == {"mood"}
    lax = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": False}}
    lax_reply = complete(bundled, temperature=0, max_tokens=60, response_format=lax)["choices"][0]
    assert lax_reply["text"] != strict_reply["text"]  # the bundled model goes on with keys of its own


def test_json_object_mode_gives_an_object(bundled: ServerProcess) -> None:
    close_soon = {"125": 8}  # "}": the bundled model knows no JSON, and would run on in a key forever
    fields = {"temperature": 1.0, "seed": 4, "n": 3, "logit_bias": close_soon, "max_tokens": 100}
    replies = complete(bundled, response_format={"type": "json_object"}, **fields)["choices"]
    replies += complete(bundled, structured_outputs={"json_object": True}, **fields)["choices"]
    for reply in replies:
        assert reply["finish_reason"] == "stop", reply
        assert isinstance(json.loads(reply["text"]), dict)


def test_schema_true_allows_any_value_and_false_none(bundled: ServerProcess) -> None:
    reply = complete(bundled, temperature=0, max_tokens=40, guided_json=True, logit_bias={"48": 10})["choices"][0]
    assert reply["finish_reason"] == "stop"
    json.loads(reply["text"])
    body = {"model": TEST_MODEL, "prompt": PROMPT, "guided_json": False}
    response = httpx.post(f"{bundled.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_json"


@pytest.mark.parametrize(
    "pattern",
    [
        "1[56][0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",  # a date
        "[A-Za-z_][A-Za-z0-9_]{0,15}",  # an identifier
        "(alas|anon|adieu), (sir|madam)!",  # fixed alternatives
    ],
)
def test_regex_replies_match_in_full(bundled: ServerProcess, pattern: str) -> None:
    replies = complete(bundled, temperature=1.0, seed=3, n=4, structured_outputs={"regex": pattern})["choices"]
    replies += complete(bundled, temperature=0, guided_regex=pattern)["choices"]
    for reply in replies:
        assert reply["finish_reason"] == "stop"
        assert re.fullmatch(pattern, reply["text"]), reply["text"]


def arithmetic_value(text: str) -> float:
    """Parse (and evaluate) the arithmetic grammar's language; raises on anything outside it."""
    tokens = re.findall(r"[0-9]+|[-+*/()]", text)
    assert "".join(tokens) == text, text
    position = 0

    def take(expected: str | None = None) -> str:
        nonlocal position
        token = tokens[position]
        assert expected is None or token == expected, (text, position)
        position += 1
        return token

    def expr() -> float:
        value = term()
        while position < len(tokens) and tokens[position] in "+-":
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> float:
        value = factor()
        while position < len(tokens) and tokens[position] in "*/":
            operator, right = take(), factor()
            value = value * right if operator == "*" else (value / right if right else math_inf())
        return value

    def factor() -> float:
        if tokens[position] == "(":
            take("(")
            value = expr()
            take(")")
            return value
        number = take()
        assert number.isdigit() and len(number) <= 3, text
        return float(number)

    value = expr()
    assert position == len(tokens), text
    return value


def math_inf() -> float:
    return float("inf")


def test_grammar_replies_are_sentences_of_the_arithmetic_language(bundled: ServerProcess) -> None:
    replies = complete(bundled, temperature=1.0, seed=5, n=4, structured_outputs={"grammar": ARITHMETIC})["choices"]
    replies += complete(bundled, temperature=0, guided_grammar=ARITHMETIC)["choices"]
    for reply in replies:
        assert reply["finish_reason"] == "stop"
        arithmetic_value(reply["text"])


def test_a_choice_reply_is_one_of_the_strings(bundled: ServerProcess) -> None:
    options = ["to be", "not to be", "Ay, there's the rub", "tomorrow"]
    replies = complete(bundled, temperature=1.0, seed=9, n=4, structured_outputs={"choice": options})["choices"]
    replies += complete(bundled, temperature=0, guided_choice=options)["choices"]
    assert all(reply["text"] in options and reply["finish_reason"] == "stop" for reply in replies)


def test_a_reply_that_max_tokens_ends_is_a_valid_beginning(bundled: ServerProcess) -> None:
    schema = SCHEMAS["string patterns"]
    reply = complete(bundled, temperature=0, max_tokens=12, response_format=json_schema_format(schema))["choices"][0]
    assert reply["finish_reason"] == "length" and len(reply["text"].encode()) == 12
    matcher = compile_grammar(GrammarSpec("json_schema", json.dumps(schema))).matcher()
    for byte in reply["text"].encode():
        matcher.consume(byte)  # raises if the grammar refuses it


def test_logprobs_are_those_of_the_constrained_distribution(bundled: ServerProcess) -> None:
    reply = complete(bundled, temperature=0, logprobs=5, max_tokens=6, structured_outputs={"regex": "[0-9]{6}"})
    logprobs = reply["choices"][0]["logprobs"]
    for top in logprobs["top_logprobs"]:
        assert set(top) <= set("0123456789")
    digit = logprobs["tokens"][0]
    # the model's own logprob of that digit after the prompt, scored with echo
    scored = complete(bundled, prompt=PROMPT + digit, echo=True, logprobs=0, max_tokens=0)["choices"][0]["logprobs"]
    model_logprob = scored["token_logprobs"][-1]
    digits = complete(bundled, temperature=0, logprobs=20, max_tokens=1, structured_outputs={"regex": "[0-9]"})
    first = digits["choices"][0]["logprobs"]["top_logprobs"][0]
    assert set(first) == set("0123456789")  # all ten, and nothing else
    assert sum(math.exp(value) for value in first.values()) == pytest.approx(1, abs=1e-4)  # the end cannot come
    assert logprobs["token_logprobs"][0] > model_logprob  # renormalised over the digits


def test_a_constrained_and_an_unconstrained_request_batched_leave_the_unconstrained_text_alone(
    bundled: ServerProcess,
) -> None:
    plain = {"temperature": 1.0, "seed": 77, "max_tokens": 60}
    alone = complete(bundled, **plain)["choices"][0]["text"]
    greedy_alone = complete(bundled, temperature=0, max_tokens=60)["choices"][0]["text"]
    constrained = {"temperature": 1.0, "seed": 1, "n": 3, "response_format": json_schema_format(SCHEMAS["enums"])}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, bundled, **constrained) for _ in range(2)]
        sampled = pool.submit(complete, bundled, **plain)
        greedy = pool.submit(complete, bundled, temperature=0, max_tokens=60)
        assert sampled.result()["choices"][0]["text"] == alone
        assert greedy.result()["choices"][0]["text"] == greedy_alone
        first, second = (future.result()["choices"] for future in futures)
    assert [c["text"] for c in first] == [c["text"] for c in second]  # seeded constrained replies reproduce


def test_streamed_and_chat_replies_follow_the_schema(bundled: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{bundled.url}/v1", api_key="unused", max_retries=0)
    schema = SCHEMAS["optional properties, no others"]
    stream = client.completions.create(
        model=TEST_MODEL,
        prompt=PROMPT,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"response_format": json_schema_format(schema)},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert text == complete(bundled, temperature=0, response_format=json_schema_format(schema))["choices"][0]["text"]
    jsonschema.validate(json.loads(text), schema)
    chat = client.chat.completions.create(
        model=TEST_MODEL,
        messages=[{"role": "user", "content": "Who art thou?"}],
        max_completion_tokens=200,
        temperature=0,
        response_format=json_schema_format(schema),
    )
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": json_schema_format({"type": "strin"})}, "response_format.json_schema.schema"),
        ({"response_format": json_schema_format({"$ref": "#/nowhere"})}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a" * 70000}}, "structured_outputs.regex"),
        ({"guided_json": '{"items":' * 5000 + "{}" + "}" * 5000}, "guided_json"),
        ({"guided_json": '{"properties":{"a":' * 400 + "{}" + "}}" * 400}, "guided_json"),
        ({"response_format": json_schema_format({"not": {"type": "string"}})}, "response_format.json_schema.schema"),
        # constraints that compile but cannot work: refused before they start
        ({"guided_grammar": "start: a\na: a"}, "guided_grammar"),  # a language with no sentence
        ({"guided_regex": "[^\\x00-\\x{10FFFF}]"}, "guided_regex"),
        ({"guided_json": "1" * 5000}, "guided_json"),  # an integer too long for json to read
        (
            {"guided_json": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}},
            "guided_json",
        ),
    ],
)
def test_a_constraint_the_server_cannot_compile_is_a_400_naming_the_field(
    bundled: ServerProcess, fields: dict, param: str
) -> None:
    body = {"model": TEST_MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}
    response = httpx.post(f"{bundled.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param), error
    assert error["message"]


def test_the_constraint_fields_are_known_fields_and_unknown_ones_inside_are_named(bundled: ServerProcess) -> None:
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "r", "description": "d", "schema": {}, "strict": True},
    }
    for fields in (
        {"response_format": schema_format},
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"json": {"type": "object"}}},
        {"structured_outputs": {"choice": ["a"]}},
    ):
        body = {"model": TEST_MODEL, "prompt": PROMPT, "max_tokens": 1, **fields}
        response = httpx.post(f"{bundled.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert "x-windowlm-ignored-fields" not in response.headers, fields
    unknown = {"type": "json_schema", "json_schema": {"name": "r", "schema": {}, "shape": 1}, "extra": 2}
    body = {"model": TEST_MODEL, "prompt": PROMPT, "max_tokens": 1, "response_format": unknown}
    response = httpx.post(f"{bundled.url}/v1/completions", json=body, timeout=30)
    assert response.headers["x-windowlm-ignored-fields"] == "response_format.json_schema.shape, response_format.extra"


def test_a_constraint_that_fails_while_generating_is_the_requests_fault_not_a_stop(bundled: ServerProcess) -> None:
    ambiguous = 'start: a "y"\na: a a | "x"'  # each "x" grows the parser's rows until they pass the limit
    fields = {"temperature": 0, "max_tokens": 1200, "guided_grammar": ambiguous, "logit_bias": {"121": -100}}
    body = {"model": TEST_MODEL, "prompt": PROMPT, **fields}
    response = httpx.post(f"{bundled.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert "the constraint failed" in response.json()["error"]["message"]
    streamed = httpx.post(f"{bundled.url}/v1/completions", json={**body, "stream": True}, timeout=120).text
    assert '"type": "invalid_request_error"' in streamed.replace('":"', '": "') and streamed.endswith("[DONE]\n\n")
    banned = {"model": TEST_MODEL, "prompt": PROMPT, "guided_regex": "a", "logit_bias": {"97": -100}}
    response = httpx.post(f"{bundled.url}/v1/completions", json=banned, timeout=30)
    assert response.status_code == 400 and "constraint" in response.json()["error"]["message"]


def test_a_union_member_is_read_by_its_type(bundled: ServerProcess) -> None:
    mixed = {"type": "json_object", "json_schema": {"name": "r", "schema": {}}}
    body = {"model": TEST_MODEL, "prompt": PROMPT, "max_tokens": 1, "response_format": mixed}
    response = httpx.post(f"{bundled.url}/v1/completions", json=body, timeout=30)
    assert response.headers["x-windowlm-ignored-fields"] == "response_format.json_schema"
