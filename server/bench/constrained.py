"""`windowlm bench constrained`: what a JSON schema constraint costs the decode loop, as JSON.

Decode speed: for each `--slots` count, one engine of that many slots (the bundled model, in process, its loop on
the main thread as in `windowlm serve`) runs rounds of as many requests at once, all with the same prompt, greedy,
`--tokens` each: constrained rounds (every request under the `records` schema below, whose shortest valid text
is 1,861 bytes, so no request can end before its max_tokens and the batch stays full) and unconstrained
ones, alternately (which goes first alternates too), `--rounds` of each after an untimed warm-up of each. What is
timed, on the engine's side: the steps in which every slot decoded (the prompts are read together, so every
step after them), each from the end of the step before it to its own end, scheduling and event delivery
included; tokens/s is the tokens those steps sampled over their summed time. Reported: the median over rounds of
each, and constrained over unconstrained per slot count (the target at 32 slots: >= 0.8). Every
request's finish reason and token count are checked and reported.

The constraint's own cost per step, in the same constrained rounds: the time in `model.grammar.masks()` and in
moving each slot's matcher past its token (`GrammarMatcher.consume` and `complete`), against the runner's
`decode_seconds` of that step (the batched forward and sampling, constraint included): the share a mask computed
beside the forward could hide.

Compiling: each schema of SCHEMAS compiled fresh with `compile_grammar` (no cache) `--rounds` times in turns, and
the first mask of a matcher of it (the library builds lexer states as it meets them: a request pays that too); the
median milliseconds of each, and the sum.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import server.runner
from model.grammar import Grammar, GrammarSpec, compile_grammar
from model.sampling import SamplingParams
from model.threads import THREADS_HELP, configure_threads
from server.bench.machine import finish_machine_state, machine_state
from server.config import BUNDLED_WEIGHTS
from server.engine import Engine, EngineRequest, FinishEvent, TokenEvent
from server.metrics import Metrics
from server.runner import ModelRunner
from weights.io import load_checkpoint

GREEDY = SamplingParams(temperature=0)
PROMPT = b"The warehouse inventory as JSON: "
DECODE_SCHEMA = "records"
TARGET_RATIO_AT_32 = 0.8


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema with these properties (required ones first) and no others."""
    properties = {**required, **(optional or {})}
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def text(**bounds: Any) -> dict[str, Any]:
    return {"type": "string", **bounds}


def number(kind: str = "number", **bounds: Any) -> dict[str, Any]:
    return {"type": kind, **bounds}


def array(items: dict[str, Any], low: int, high: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": low, "maxItems": high}


RECORD = {"name": text(pattern="^[a-z]{1,8}$"), "count": number("integer", minimum=0, maximum=999)}
RECORD["kind"] = {"enum": ["tool", "part", "spare"]}
SEVERITY = {"enum": ["debug", "info", "warning", "error", "critical"]}
DATE, TIME = text(pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$"), text(pattern="^[0-2][0-9]:[0-5][0-9]$")
LINE = {"sku": text(), "quantity": number("integer", minimum=1, maximum=100), "price": number(minimum=0, maximum=1e4)}
SERVER = obj({"host": text(), "port": number("integer", minimum=1, maximum=65535)})
SERVER["properties"]["tls"] = obj({"enabled": {"type": "boolean"}}, {"certificate": text()})
RECTANGLE = {"kind": {"const": "rectangle"}, "width": number(minimum=0), "height": number(minimum=0)}

# Schemas a client might send: nested objects, bounded arrays, enums, bounded numbers, required and optional
# properties, additionalProperties false, string patterns, a union and a recursive definition.
SCHEMAS: dict[str, dict[str, Any]] = {
    "records": obj({"items": array(obj(RECORD), 50, 60)}),  # the decode schema: items of 36 bytes at least
    "person": obj(
        {"name": text(minLength=1, maxLength=40), "age": number("integer", minimum=0, maximum=150)},
        {
            "email": text(pattern="^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"),
            "address": obj({"city": text()}, {"street": text(), "postcode": text(pattern="^[0-9]{5}$")}),
        },
    ),
    "order": obj(
        {"id": text(pattern="^ORD-[0-9]{6}$"), "currency": {"enum": ["EUR", "USD"]}, "lines": array(obj(LINE), 1, 10)},
        {"note": text(maxLength=200)},
    ),
    "event": obj(
        {"date": DATE, "severity": SEVERITY, "message": text(maxLength=120)},
        {"time": TIME, "source": text(pattern="^[a-z]+(\\.[a-z]+)*$")},
    ),
    "config": obj({"server": SERVER}, {"workers": number("integer", minimum=1, maximum=64), "log_level": SEVERITY}),
    "matrix": obj({"rows": array(array(number(minimum=-1, maximum=1), 2, 4), 2, 4)}, {"label": text(maxLength=16)}),
    "shape": {"anyOf": [obj({"kind": {"const": "circle"}, "radius": number(exclusiveMinimum=0)}), obj(RECTANGLE)]},
    "tree": {
        "$defs": {"node": obj({"name": text(maxLength=24)}, {"children": array({"$ref": "#/$defs/node"}, 0, 8)})},
        "$ref": "#/$defs/node",
    },
}


def spec_of(name: str) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(SCHEMAS[name]))


def compile_times(rounds: int) -> dict[str, Any]:
    """Median ms to compile each schema fresh and to compute its first mask; schemas in turns, after an untimed
    compile that keeps the library's one-time start-up out of the first figure."""
    compile_grammar(GrammarSpec("json_schema", '{"type": "integer"}')).matcher().mask_bytes()
    seen: dict[str, dict[str, list[float]]] = {name: {"compile": [], "mask": []} for name in SCHEMAS}
    for _ in range(rounds):
        for name in SCHEMAS:
            started = time.perf_counter()
            grammar = compile_grammar(spec_of(name))
            compiled = time.perf_counter()
            grammar.matcher().mask_bytes()
            seen[name]["compile"].append(1000 * (compiled - started))
            seen[name]["mask"].append(1000 * (time.perf_counter() - compiled))
    per_schema = {
        name: {"compile_ms": statistics.median(times["compile"]), "first_mask_ms": statistics.median(times["mask"])}
        for name, times in seen.items()
    }
    return {
        "schemas": per_schema,
        "total_compile_ms": sum(one["compile_ms"] for one in per_schema.values()),
        "total_first_mask_ms": sum(one["first_mask_ms"] for one in per_schema.values()),
    }


@dataclass
class StepRecord:
    rows: int  # decode rows of the step
    sampled: int  # tokens it sampled
    ended_at: float
    decode_seconds: float | None  # the runner's: the batched forward and sampling
    masks_seconds: float
    advance_seconds: float  # matchers moved past their tokens (constrained slots only)


class StepLog:
    """Records every step of an engine's runner: wraps the runner's `run` and `advance_grammar` on the instance,
    and, while `timing_masks` holds, the `masks` the runner module calls."""

    def __init__(self, runner: ModelRunner) -> None:
        self.records: list[StepRecord] = []
        self.masks_seconds = self.advance_seconds = 0.0
        run, advance = runner.run, runner.advance_grammar

        def timed_run(plan):
            self.masks_seconds = self.advance_seconds = 0.0
            output = run(plan)
            self.records.append(
                StepRecord(
                    len(plan.decode_rows),
                    len(output.sampled),
                    time.perf_counter(),
                    output.decode_seconds,
                    self.masks_seconds,
                    self.advance_seconds,
                )
            )
            return output

        def timed_advance(slot: int, token: int, output):
            if runner.matchers[slot] is None:
                return advance(slot, token, output)
            started = time.perf_counter()
            try:
                return advance(slot, token, output)
            finally:
                self.advance_seconds += time.perf_counter() - started

        runner.run, runner.advance_grammar = timed_run, timed_advance

    @contextlib.contextmanager
    def timing_masks(self) -> Iterator[None]:
        masks = server.runner.masks

        def timed_masks(matchers, device="cpu"):
            started = time.perf_counter()
            try:
                return masks(matchers, device)
            finally:
                self.masks_seconds += time.perf_counter() - started

        server.runner.masks = timed_masks
        try:
            yield
        finally:
            server.runner.masks = masks


def round_figures(records: list[StepRecord], slots: int) -> dict[str, float]:
    """Tokens/s over the steps where every slot decoded (each timed from the end of the step before), and the
    medians of their decode step and constraint times."""
    full = [(before, step) for before, step in itertools.pairwise(records) if step.rows == slots]
    if not full:
        raise RuntimeError("no step decoded every slot: raise --tokens")
    seconds = sum(step.ended_at - before.ended_at for before, step in full)
    steps = [step for _, step in full]
    return {
        "tokens_per_second": sum(step.sampled for step in steps) / seconds,
        "decode_step_ms": 1000 * statistics.median(step.decode_seconds or 0.0 for step in steps),
        "masks_ms": 1000 * statistics.median(step.masks_seconds for step in steps),
        "consume_ms": 1000 * statistics.median(step.advance_seconds for step in steps),
        "constraint_share": statistics.median(
            (step.masks_seconds + step.advance_seconds) / step.decode_seconds for step in steps if step.decode_seconds
        ),
    }


async def one_round(engine: Engine, log: StepLog, slots: int, tokens: int, grammar: Grammar | None) -> dict:
    """`slots` requests at once, every token read as it comes -> the round's figures, finish reasons and token
    counts, and the text of its first request."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    requests = [EngineRequest(list(PROMPT), GREEDY, tokens, loop, events, tag=i, grammar=grammar) for i in range(slots)]
    first = len(log.records)
    engine.submit(requests)
    reasons: dict[int, str] = {}
    texts: list[list[int]] = [[] for _ in requests]
    while len(reasons) < slots:
        tag, event = await events.get()
        if isinstance(event, TokenEvent):
            texts[tag].append(event.token)
            requests[tag].mark_delivered(1)  # unread tokens would pause the slot
        elif isinstance(event, FinishEvent):
            reasons[tag] = event.reason if event.message is None else f"{event.reason}: {event.message}"
    figures = round_figures(log.records[first:], slots)
    return {**figures, "reasons": list(reasons.values()), "counts": [len(t) for t in texts], "text": texts[0]}


def measure_slots(model: torch.nn.Module, slots: int, grammar: Grammar, args: argparse.Namespace) -> dict[str, Any]:
    """Constrained and unconstrained rounds in turns on one engine of `slots` slots (its loop on this thread)."""
    engine = Engine(
        model, max_batch_size=slots, max_queue=slots, metrics=Metrics(), prompt_tokens_per_step=slots * len(PROMPT)
    )
    log = StepLog(engine.runner)
    kinds = {"constrained": grammar, "unconstrained": None}
    seen: dict[str, list[dict]] = {kind: [] for kind in kinds}
    failure: list[BaseException] = []

    async def rounds() -> None:
        while not engine.alive:
            await asyncio.sleep(0.01)
        for grammar_or_none in kinds.values():  # warm-up, untimed
            await one_round(engine, log, slots, min(args.tokens, 16), grammar_or_none)
        for index in range(args.rounds):
            order = list(kinds) if index % 2 == 0 else list(reversed(kinds))
            for kind in order:
                seen[kind].append(await one_round(engine, log, slots, args.tokens, kinds[kind]))

    def consumer() -> None:
        try:
            asyncio.run(rounds())
        except BaseException as error:
            failure.append(error)
        finally:
            engine.shutdown()

    thread = threading.Thread(target=consumer)
    with log.timing_masks():
        thread.start()
        engine.run_forever()
        thread.join()
    if failure:
        raise failure[0]
    return summary(seen, args.tokens)


def summary(seen: dict[str, list[dict]], tokens: int) -> dict[str, Any]:
    """Medians over rounds of each kind, their ratio, and the finish reasons and token counts of every request."""
    median = {kind: statistics.median(one["tokens_per_second"] for one in rounds) for kind, rounds in seen.items()}
    constrained = seen["constrained"]
    return {
        "constrained_tokens_per_second": median["constrained"],
        "unconstrained_tokens_per_second": median["unconstrained"],
        "constrained_over_unconstrained": median["constrained"] / median["unconstrained"],
        "rounds_tokens_per_second": {kind: [one["tokens_per_second"] for one in runs] for kind, runs in seen.items()},
        "decode_step_ms": {
            kind: statistics.median(one["decode_step_ms"] for one in rounds) for kind, rounds in seen.items()
        },
        "constraint_per_step": {
            "masks_ms": statistics.median(one["masks_ms"] for one in constrained),
            "consume_ms": statistics.median(one["consume_ms"] for one in constrained),
            "share_of_decode_step": statistics.median(one["constraint_share"] for one in constrained),
        },
        "finish_reasons": {
            kind: dict(Counter(reason for one in rounds for reason in one["reasons"])) for kind, rounds in seen.items()
        },
        "every_constrained_request_ran_to_length": all(
            reason == "length" for one in constrained for reason in one["reasons"]
        )
        and all(count == tokens for one in constrained for count in one["counts"]),
        "constrained_text_sample": bytes(constrained[-1]["text"]).decode("utf-8", "replace"),
    }


def run_constrained_bench(args: argparse.Namespace) -> dict[str, Any]:
    configure_threads(args.threads)
    machine = machine_state()
    model = load_checkpoint(args.weights)[0]
    compiling = compile_times(args.rounds)
    grammar = compile_grammar(spec_of(DECODE_SCHEMA))
    slot_counts = [count for group in args.slots for count in group]
    by_slots = {str(slots): measure_slots(model, slots, grammar, args) for slots in slot_counts}
    report: dict[str, Any] = {
        "machine": machine,
        "weights": str(args.weights),
        "prompt": PROMPT.decode(),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "decode_schema": DECODE_SCHEMA,
        "decode": by_slots,
        "compile": compiling,
    }
    if "32" in by_slots:
        ratio = by_slots["32"]["constrained_over_unconstrained"]
        report["ratio_at_32_slots"] = {"ratio": ratio, "target": TARGET_RATIO_AT_32, "met": ratio >= TARGET_RATIO_AT_32}
    finish_machine_state(machine)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_constrained_bench_arguments(parser: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part]

    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help="checkpoint to load (default: bundled)")
    parser.add_argument(
        "--slots", type=numbers, nargs="+", default=[[1, 32]], help="slot counts (batch sizes), e.g. 1 32 or 1,32"
    )
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind, in turns (and compiles per schema)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--out", help="also write the JSON to this file")
