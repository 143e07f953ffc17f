"""Compiling a request's constraint: off the event loop, within the settings' limits, cached by its text.

Compiles run one at a time on a thread of their own (llguidance releases the GIL while it builds a grammar), so
that a slow one delays only other compiles, never the event loop or the engine. A request waits for its compile
at most `grammar_compile_timeout` seconds, its wait in line included, then gets a 400; a compile that outlives
its request runs on to llguidance's own limits and is dropped. Results are cached by the constraint's text, and
so are rejections: a schema the library refused is refused again without compiling.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from model.grammar import Grammar, GrammarError, GrammarSpec, compile_grammar
from server.config import Settings
from server.constraint_protocol import ConstraintFields
from server.errors import InvalidRequest
from server.metrics import Metrics


class GrammarCompiler:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.max_bytes = settings.grammar_max_bytes
        self.timeout = settings.grammar_compile_timeout
        self.cache_size = settings.grammar_cache_size
        self.cache: OrderedDict[GrammarSpec, Grammar | GrammarError] = OrderedDict()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="windowlm-grammar")

    async def for_request(self, body: ConstraintFields) -> Grammar | None:
        """The compiled constraint the request asks for, None if it asks for none; a 400 naming the field when
        it is too long, the library refuses it, or compiling takes too long."""
        found = body.grammar_spec()
        if found is None:
            return None
        spec, param = found
        size = len(spec.text.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            raise InvalidRequest(
                f"{param}: the {_NAMES[spec.kind]} is {size} bytes; this server compiles at most {self.max_bytes}",
                param=param,
            )
        compiled = self.cache.get(spec)
        if compiled is None:
            compiled = await self.compile(spec, param)
        else:
            self.cache.move_to_end(spec)
            self.count("cached")
        if isinstance(compiled, GrammarError):
            raise InvalidRequest(f"{param}: invalid {_NAMES[spec.kind]}: {compiled}", param=param)
        return compiled

    async def compile(self, spec: GrammarSpec, param: str) -> Grammar | GrammarError:
        loop = asyncio.get_running_loop()
        try:
            compiling = loop.run_in_executor(self.executor, timed_compile, spec)
            compiled, seconds = await asyncio.wait_for(compiling, self.timeout)
        except asyncio.TimeoutError:
            self.count("timeout")
            raise InvalidRequest(
                f"{param}: compiling the {_NAMES[spec.kind]} took more than {self.timeout:g} s "
                "(grammar_compile_timeout)",
                param=param,
            ) from None
        self.count("refused" if isinstance(compiled, GrammarError) else "compiled", seconds)
        if self.cache_size:
            self.cache[spec] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled

    def count(self, outcome: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.grammar_compiled(outcome, seconds)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def timed_compile(spec: GrammarSpec) -> tuple[Grammar | GrammarError, float]:
    """(the compiled grammar, or why it cannot be compiled, whatever the library raised: the text is at fault;
    the seconds it took)."""
    started = time.perf_counter()
    try:
        compiled: Grammar | GrammarError = compile_grammar(spec)
    except Exception as error:
        compiled = error if isinstance(error, GrammarError) else GrammarError(f"{type(error).__name__}: {error}")
    return compiled, time.perf_counter() - started


_NAMES = {"json_schema": "JSON schema", "regex": "regular expression", "grammar": "grammar", "choice": "choice list"}
