"""Compiling a request's constraint: off the event loop, within the settings' limits, cached by its text.

Compiles run one at a time on a thread of their own (llguidance releases the GIL while it builds a grammar), so
that a slow one delays only other compiles, never the event loop or the engine. Requests for a constraint that
is being compiled wait for that compile; at most MAX_PENDING distinct ones wait or run at once, and more are
answered 429. A request waits at most `grammar_compile_timeout` seconds (its wait in line included), then gets a
400; its compile runs on, to llguidance's own limits, and its result is cached for the next request. Results
are cached by the constraint's text, and so are rejections: a schema the library refused is refused again
without compiling. A compiled 64 KiB grammar holds about 4 MiB, so the cache is small by default.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from model.grammar import Grammar, GrammarError, GrammarSpec, compile_grammar
from server.config import Settings
from server.constraint_protocol import ConstraintFields
from server.errors import InvalidRequest, Overloaded
from server.metrics import Metrics

MAX_PENDING = 16  # distinct constraints compiling or waiting to

Compiled = Grammar | GrammarError


class GrammarCompiler:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.max_bytes = settings.grammar_max_bytes
        self.timeout = settings.grammar_compile_timeout
        self.cache_size = settings.grammar_cache_size
        self.cache: OrderedDict[GrammarSpec, Compiled] = OrderedDict()
        self.pending: dict[GrammarSpec, asyncio.Future[tuple[Compiled, float]]] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="windowlm-grammar")

    async def for_request(self, body: ConstraintFields) -> Grammar | None:
        """The compiled constraint the request asks for, None if it asks for none; a 400 naming the field when
        it is too long, the library refuses it, or compiling takes too long; a 429 when too many wait."""
        found = body.grammar_spec(self.max_bytes)
        if found is None:
            return None
        spec, param = found
        compiled = self.cache.get(spec)
        if compiled is None:
            compiled = await self.compile(spec, param)
        else:
            self.cache.move_to_end(spec)
            self.count("cached")
        if isinstance(compiled, GrammarError):
            raise InvalidRequest(f"{param}: invalid {_NAMES[spec.kind]}: {compiled}", param=param)
        return compiled

    async def compile(self, spec: GrammarSpec, param: str) -> Compiled:
        pending = self.pending.get(spec)
        if pending is None:
            if len(self.pending) >= MAX_PENDING:
                raise Overloaded(f"{MAX_PENDING} constraints are being compiled; retry later", code="overloaded")
            pending = asyncio.get_running_loop().run_in_executor(self.executor, timed_compile, spec)
            self.pending[spec] = pending
            pending.add_done_callback(lambda done: self.finished(spec, done))
        try:
            compiled, _ = await asyncio.wait_for(asyncio.shield(pending), self.timeout)
        except asyncio.TimeoutError:
            self.count("timeout")
            raise InvalidRequest(
                f"{param}: compiling the {_NAMES[spec.kind]} took more than {self.timeout:g} s "
                "(grammar_compile_timeout)",
                param=param,
            ) from None
        return compiled

    def finished(self, spec: GrammarSpec, done: asyncio.Future[tuple[Compiled, float]]) -> None:
        """A compile ended (on the event loop): count it and cache what it gave, whoever still waits."""
        self.pending.pop(spec, None)
        if done.cancelled() or done.exception() is not None:
            return
        compiled, seconds = done.result()
        self.count("refused" if isinstance(compiled, GrammarError) else "compiled", seconds)
        if self.cache_size:
            self.cache[spec] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)

    def count(self, outcome: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.grammar_compiled(outcome, seconds)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def timed_compile(spec: GrammarSpec) -> tuple[Compiled, float]:
    """(the compiled grammar, or why it cannot be compiled, whatever the library raised: the text is at fault;
    the seconds it took)."""
    started = time.perf_counter()
    try:
        compiled: Compiled = compile_grammar(spec)
    except Exception as error:
        compiled = error if isinstance(error, GrammarError) else GrammarError(f"{type(error).__name__}: {error}")
    return compiled, time.perf_counter() - started


_NAMES = {"json_schema": "JSON schema", "regex": "regular expression", "grammar": "grammar", "choice": "choice list"}
