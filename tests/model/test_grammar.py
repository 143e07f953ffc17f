"""Byte-level constraints: the masks llguidance gives for the 256 bytes and the end, and sampling under them —
only allowed bytes, the end as one more candidate weighted by the forbidden bytes' probability, the constrained
distribution in the logprobs, seeds that reproduce, and rows that depend on no other row."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from model.grammar import END, GrammarError, GrammarSpec, compile_grammar, masks
from model.sampling import ENDED_TOKEN, FAILED_TOKEN, SamplingParams, SequenceSampler, sample_batch

GREEDY = SamplingParams(temperature=0)


def allowed_bytes(spec: GrammarSpec, text: bytes) -> set[int]:
    matcher = compile_grammar(spec).matcher()
    for byte in text:
        matcher.consume(byte)
    row = masks([matcher])[0]  # (257,)
    return {int(token) for token in row.nonzero()}


def test_masks_are_the_bytes_the_pattern_allows_then_the_end() -> None:
    date = GrammarSpec("regex", "[0-9]{4}-[0-9]{2}")
    assert allowed_bytes(date, b"") == set(b"0123456789")
    assert allowed_bytes(date, b"2024") == {ord("-")}
    assert allowed_bytes(date, b"2024-1") == set(b"0123456789")
    assert allowed_bytes(date, b"2024-12") == {END}


def test_a_choice_that_is_a_prefix_of_another_may_end_or_go_on() -> None:
    choice = GrammarSpec("choice", json.dumps(["yes", "yesterday"]))
    assert allowed_bytes(choice, b"yes") == {ord("t"), END}


def test_multibyte_characters_are_allowed_byte_by_byte() -> None:
    choice = GrammarSpec("choice", json.dumps(["été", "hiver"]))
    assert allowed_bytes(choice, b"") == {0xC3, ord("h")}
    assert allowed_bytes(choice, "é".encode()) == {ord("t")}


def test_a_refused_byte_raises_and_a_complete_grammar_says_so() -> None:
    matcher = compile_grammar(GrammarSpec("regex", "ab")).matcher()
    with pytest.raises(GrammarError):
        matcher.consume(ord("x"))
    matcher = compile_grammar(GrammarSpec("regex", "ab")).matcher()
    matcher.consume(ord("a"))
    assert not matcher.complete
    matcher.consume(ord("b"))
    assert matcher.complete


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("json_schema", '{"type": "strin"}'),
        ("json_schema", '{"properties": {"a": {"$ref": "#/missing"}}}'),
        ("json_schema", "not json"),
        ("json_schema", "[1, 2]"),
        ("regex", "[a-"),
        ("regex", "(ab"),
        ("grammar", "start: undefined_rule"),
        ("choice", "not json"),
    ],
)
def test_what_the_library_refuses_is_a_grammar_error(kind: str, text: str) -> None:
    with pytest.raises(GrammarError) as refused:
        compile_grammar(GrammarSpec(kind, text))
    assert str(refused.value)


def test_each_matcher_starts_from_the_beginning() -> None:
    grammar = compile_grammar(GrammarSpec("regex", "ab"))
    first = grammar.matcher()
    first.consume(ord("a"))
    second = grammar.matcher()
    assert {int(t) for t in masks([first, second])[1].nonzero()} == {ord("a")}


def constrained(logits: torch.Tensor, allowed: list[int], may_end: bool) -> torch.Tensor:  # (1, 257)
    row = torch.zeros(1, 257, dtype=torch.bool)
    row[0, allowed] = True
    row[0, END] = may_end
    return row


def test_greedy_picks_the_best_allowed_byte_or_ends_when_the_forbidden_mass_outweighs_it() -> None:
    logits = torch.full((1, 256), -10.0)
    logits[0, ord("a")] = 2.0  # forbidden below: its mass becomes the end's
    logits[0, ord("1")] = 1.0
    logits[0, ord("2")] = 1.5
    sampler = SequenceSampler(GREEDY, 256)
    assert sample_batch(logits, [sampler], constrained(logits, [ord("1"), ord("2")], False)).tokens.item() == ord("2")
    ended = sample_batch(logits, [sampler], constrained(logits, [ord("1"), ord("2")], True))
    assert ended.tokens.item() == ENDED_TOKEN
    logits[0, ord("2")] = 3.0
    assert sample_batch(logits, [sampler], constrained(logits, [ord("1"), ord("2")], True)).tokens.item() == ord("2")


def test_where_every_byte_is_allowed_the_end_has_no_weight() -> None:
    logits = torch.randn(1, 256)
    result = sample_batch(logits, [SequenceSampler(GREEDY, 256)], constrained(logits, list(range(256)), True))
    assert result.tokens.item() == logits.argmax().item()


def test_logprobs_are_those_of_the_constrained_distribution() -> None:
    logits = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    allowed = [ord(c) for c in "0123456789"]
    sampler = SequenceSampler(SamplingParams(temperature=0, logprobs=20), 256)
    result = sample_batch(logits, [sampler], constrained(logits, allowed, True))
    forbidden = torch.ones(256, dtype=torch.bool)
    forbidden[allowed] = False
    widened = torch.cat([logits[0].masked_fill(forbidden, -math.inf), logits[0][forbidden].logsumexp(0, keepdim=True)])
    expected = torch.log_softmax(widened, 0)  # (257,)
    token = result.tokens.item()
    chosen = END if token == ENDED_TOKEN else token
    assert result.logprobs.item() == pytest.approx(expected[chosen].item(), abs=1e-6)
    alternatives = dict(result.top_logprobs[0])
    assert set(alternatives) == set(allowed)  # the end is no token: never among the alternatives
    for byte, logprob in alternatives.items():
        assert logprob == pytest.approx(expected[byte].item(), abs=1e-6)


def test_nothing_left_to_pick_fails_the_row_alone() -> None:
    logits = torch.randn(2, 256)
    params = SamplingParams(temperature=0, logit_bias=((ord("x"), -100),))
    samplers = [SequenceSampler(params, 256), SequenceSampler(GREEDY, 256)]
    allowed = torch.cat([constrained(logits, [ord("x")], False), constrained(logits, [ord("y")], False)])
    result = sample_batch(logits, samplers, allowed)
    assert result.tokens.tolist() == [FAILED_TOKEN, ord("y")]
    assert "constraint" in result.errors[0]


def walk(spec: GrammarSpec, params: list[SamplingParams], steps: int, seed: int) -> list[bytes | None]:
    """Generate every row under the grammar from random logits (the same logits for a row alone or batched) ->
    each row's text once it ended, None if it was still going after `steps`."""
    grammar = compile_grammar(spec)
    matchers = [grammar.matcher() for _ in params]
    samplers = [SequenceSampler(p, 256) for p in params]
    texts: list[bytearray] = [bytearray() for _ in params]
    done: list[bool] = [False] * len(params)
    logit_source = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logits = torch.randn(len(params), 256, generator=logit_source) * 3
        live = [row for row in range(len(params)) if not done[row]]
        if not live:
            break
        result = sample_batch(logits[live], [samplers[r] for r in live], masks([matchers[r] for r in live]))
        for row, token in zip(live, result.tokens.tolist(), strict=True):
            if token == ENDED_TOKEN:
                done[row] = True
                continue
            matchers[row].consume(token)
            texts[row].append(token)
            done[row] = matchers[row].complete
    return [bytes(text) if finished else None for text, finished in zip(texts, done, strict=True)]


SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "kind": {"enum": ["a", "b"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["id", "kind", "code"],
    "additionalProperties": False,
}


def test_every_ended_text_parses_and_validates_against_its_schema() -> None:
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in range(12)]
    texts = walk(GrammarSpec("json_schema", json.dumps(SCHEMA)), params, steps=200, seed=1)
    ended = [text for text in texts if text is not None]
    assert len(ended) >= 10
    for text in ended:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_every_ended_text_matches_the_pattern_in_full() -> None:
    pattern = "[a-z_][a-z0-9_]{0,11}|[0-9]{4}-[0-9]{2}-[0-9]{2}"
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in range(12)]
    for text in walk(GrammarSpec("regex", pattern), params, steps=40, seed=2):
        assert text is not None and re.fullmatch(pattern, text.decode()), text


def test_a_seeded_constrained_row_is_the_same_alone_and_batched() -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in range(4)]
    batched = walk(spec, params, steps=120, seed=5)
    for row, one in enumerate(params):
        # alone, row `row` sees its own logits: the batch's row of each step
        assert walk_alone(spec, one, row, len(params), steps=120, seed=5) == batched[row]


def walk_alone(spec: GrammarSpec, params: SamplingParams, row: int, rows: int, steps: int, seed: int) -> bytes | None:
    grammar = compile_grammar(spec)
    matcher, sampler, text = grammar.matcher(), SequenceSampler(params, 256), bytearray()
    logit_source = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logits = torch.randn(rows, 256, generator=logit_source) * 3
        token = sample_batch(logits[row : row + 1], [sampler], masks([matcher])).tokens.item()
        if token == ENDED_TOKEN:
            return bytes(text)
        matcher.consume(token)
        text.append(token)
        if matcher.complete:
            return bytes(text)
    return None
