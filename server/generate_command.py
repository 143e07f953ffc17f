"""`windowlm generate`: one prompt's completion streamed to stdout, through the server's own engine and text
code (an engine of one slot in this process; no HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import TextIO

from model.grammar import Grammar, GrammarSpec, compile_grammar
from model.sampling import SamplingError, SamplingParams
from model.threads import THREADS_HELP, configure_threads
from model.tokenizer import ByteTokenizer
from server.choices import ChoiceText, GenerationFailed, merge_choice_events
from server.engine import Engine
from server.engine_request import EngineRequest
from server.metrics import Metrics
from server.scheduler import tokens_that_fit
from server.strict_schema import strict_schema_text

USAGE_ERROR = 2


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument(
        "--weights", default=None, help="checkpoint folder (default: WINDOWLM_WEIGHTS, else the bundled model)"
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument(
        "--read-whole-prompt",
        action="store_true",
        help="read every prompt token, not only the last ones the model can still see (same logits; to compare)",
    )
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    constraint = parser.add_argument_group("constraint (one at most)").add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="SCHEMA", help="a JSON schema the text follows, or @FILE")
    constraint.add_argument("--regex", help="a regular expression the whole text matches")
    constraint.add_argument("--grammar", metavar="LARK", help="a Lark grammar the text follows, or @FILE")
    constraint.add_argument("--choice", action="append", help="the text is one of these strings (repeatable)")


def grammar_of(args: argparse.Namespace) -> Grammar | None:
    """The constraint the arguments ask for, compiled (a schema strict, as the API has it); GrammarError,
    ValueError or OSError if it cannot be."""
    if args.choice:
        return compile_grammar(GrammarSpec("choice", json.dumps(args.choice)))
    for kind, given in (("json_schema", args.json_schema), ("regex", args.regex), ("grammar", args.grammar)):
        if given is not None:
            text = Path(given[1:]).read_text() if kind != "regex" and given.startswith("@") else given
            return compile_grammar(GrammarSpec(kind, strict_schema_text(text) if kind == "json_schema" else text))
    return None


def run_generate(args: argparse.Namespace) -> int:
    from server.config import weights_folder
    from weights.io import CheckpointError, load_checkpoint

    try:
        model, _ = load_checkpoint(weights_folder(args.weights))
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        params.validate()
        grammar = grammar_of(args)
    except (CheckpointError, SamplingError, ValueError, OSError, RecursionError) as error:
        return usage_error(str(error))
    if args.max_tokens < 1:
        return usage_error("--max-tokens must be at least 1")
    if args.threads is not None and args.threads < 1:
        return usage_error("--threads must be at least 1")
    configure_threads(args.threads)
    prompt = ByteTokenizer().encode(args.prompt)
    engine = Engine(model, max_batch_size=1, max_queue=0, metrics=Metrics(), read_whole_prompt=args.read_whole_prompt)
    fit = tokens_that_fit(len(prompt), engine.context_limit)
    if not prompt or (fit is not None and fit < 1):
        return usage_error(f"the prompt has {len(prompt)} tokens; this model's context is {engine.context_limit}")

    request = EngineRequest(prompt, params, args.max_tokens, None, None, grammar=grammar)  # the reader sets the loop
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            asyncio.run(stream_completion(engine, request, args.stop, sys.stdout))
        except BaseException as error:
            outcome.append(error)
        finally:
            engine.shutdown()

    reader = threading.Thread(target=read, name="windowlm-generate")
    reader.start()
    engine.run_forever()  # on the main thread, where torch's CPU thread pool is fastest
    reader.join()
    if outcome:
        print(f"windowlm generate: {outcome[0]}", file=sys.stderr)
        return 1
    return 0


async def stream_completion(engine: Engine, request: EngineRequest, stop: list[str], out: TextIO) -> None:
    """Submit the request once the engine runs, and write its text as it comes."""
    while not engine.alive:
        if engine.failure is not None:
            raise GenerationFailed(f"the engine failed: {engine.failure}")
        await asyncio.sleep(0.001)
    request.loop, request.events = asyncio.get_running_loop(), asyncio.Queue()
    engine.submit([request])
    choice = ChoiceText(0, stop)
    async for deltas in merge_choice_events([request], [choice], idle_seconds=3600):
        for delta in deltas or []:
            out.write(delta.text)
            out.flush()
    out.write("\n")
    out.flush()


def usage_error(message: str) -> int:
    print(f"windowlm generate: {message}", file=sys.stderr)
    return USAGE_ERROR
