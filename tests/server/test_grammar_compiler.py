"""The server's constraint compiler: a cache by text (rejections too), a size limit checked before compiling, a
time limit that answers 400 while the event loop stays free, and strict schemas by default."""

from __future__ import annotations

import asyncio
import time

import pytest

from model.grammar import Grammar
from server.config import Settings
from server.constraints import GrammarCompiler
from server.errors import InvalidRequest, Overloaded
from server.metrics import Metrics
from server.protocol import CompletionRequest


def request(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


def compile_for(compiler: GrammarCompiler, body: CompletionRequest) -> Grammar | None:
    return asyncio.run(compiler.for_request(body))


def outcomes(metrics: Metrics) -> dict[str, float]:
    name = "windowlm_grammar_compiles_total"
    values = {outcome: {"model": "m", "outcome": outcome} for outcome in ("compiled", "cached", "refused", "timeout")}
    return {outcome: metrics.registry.get_sample_value(name, labels) for outcome, labels in values.items()}


def test_a_constraint_is_compiled_once_and_a_refusal_is_remembered() -> None:
    metrics = Metrics("m")
    compiler = GrammarCompiler(Settings(), metrics)
    first = compile_for(compiler, request(guided_regex="[a-z]+"))
    assert compile_for(compiler, request(structured_outputs={"regex": "[a-z]+"})) is first
    assert compile_for(compiler, request(guided_regex="[a-z]*")) is not first
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="unclosed character class"):
            compile_for(compiler, request(guided_regex="[a-"))
    assert len(compiler.cache) == 3
    assert outcomes(metrics) == {"compiled": 2, "cached": 2, "refused": 1, "timeout": 0}
    assert metrics.registry.get_sample_value("windowlm_grammar_compile_seconds_count", {"model": "m"}) == 3


def test_the_cache_keeps_the_most_recently_used() -> None:
    compiler = GrammarCompiler(Settings(grammar_cache_size=2))
    a = compile_for(compiler, request(guided_regex="a"))
    compile_for(compiler, request(guided_regex="b"))
    assert compile_for(compiler, request(guided_regex="a")) is a  # a is now the most recent
    compile_for(compiler, request(guided_regex="c"))  # b goes
    assert [spec.text for spec in compiler.cache] == ["a", "c"]


def test_no_constraint_compiles_nothing() -> None:
    assert compile_for(GrammarCompiler(Settings()), request(response_format={"type": "text"})) is None


def test_a_constraint_over_the_size_limit_is_refused_before_compiling() -> None:
    compiler = GrammarCompiler(Settings(grammar_max_bytes=64))
    with pytest.raises(InvalidRequest, match="at most 64") as refused:
        compile_for(compiler, request(guided_choice=["x" * 40, "y" * 40]))
    assert refused.value.param == "guided_choice"
    assert not compiler.cache


def big_schema(properties: int) -> dict:
    """A valid schema that takes a while to compile: about 90 ms for 1,000 properties, 440 ms for 3,000."""
    pattern = {"type": "string", "pattern": "^[a-z]{3,9}[0-9]+$"}
    names = [f"p{i}" for i in range(properties)]
    return {"type": "object", "properties": dict.fromkeys(names, pattern), "required": names}


def test_a_compile_over_the_time_limit_is_a_400_and_the_event_loop_stays_free() -> None:
    metrics = Metrics("m")
    compiler = GrammarCompiler(Settings(grammar_compile_timeout=0.2, grammar_max_bytes=10**6), metrics)

    async def scenario() -> float:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        started = time.perf_counter()
        with pytest.raises(InvalidRequest, match=r"took more than 0\.2 s") as refused:
            await compiler.for_request(request(guided_json=big_schema(6000)))
        waited = time.perf_counter() - started
        ticker.cancel()
        assert refused.value.param == "guided_json"
        assert ticks >= 10  # the loop ran while the compile did (a 5 ms tick in 200 ms)
        return waited

    assert asyncio.run(scenario()) < 1.0
    assert outcomes(metrics)["timeout"] == 1
    compiler.shutdown()


def test_one_compile_serves_every_request_for_it_and_too_many_at_once_are_a_429(monkeypatch) -> None:
    monkeypatch.setattr("server.constraints.MAX_PENDING", 2)
    metrics = Metrics("m")
    compiler = GrammarCompiler(Settings(grammar_max_bytes=10**6), metrics)

    async def scenario() -> list:
        same = [compiler.for_request(request(guided_json=big_schema(300))) for _ in range(3)]
        other = compiler.for_request(request(guided_json=big_schema(301)))
        third = compiler.for_request(request(guided_json=big_schema(302)))
        return await asyncio.gather(*same, other, third, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[0] is results[1] is results[2] and isinstance(results[0], Grammar)
    assert isinstance(results[3], Grammar)
    assert isinstance(results[4], Overloaded)  # two distinct compiles were already pending
    assert outcomes(metrics)["compiled"] == 2
    compiler.shutdown()


def test_a_compile_that_outlived_its_request_is_cached_for_the_next() -> None:
    compiler = GrammarCompiler(Settings(grammar_compile_timeout=0.01, grammar_max_bytes=10**6))

    async def scenario() -> Grammar | None:
        body = request(guided_json=big_schema(2000))
        with pytest.raises(InvalidRequest):
            await compiler.for_request(body)
        while compiler.pending:
            await asyncio.sleep(0.01)
        return await compiler.for_request(body)

    assert isinstance(asyncio.run(scenario()), Grammar)
    compiler.shutdown()
