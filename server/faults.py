"""Test-only fault injection: make chosen engine steps raise, to show how the server survives its own bugs.

Off unless the variable WINDOWLM_INJECT_FAULTS is set (never in production): `row=TEXT` makes every batched
decode step raise while one of its rows has a prompt containing TEXT (the engine must then fail that row alone);
`chunk=TEXT` makes every prompt read raise while one of its chunks belongs to such a prompt (the chunks read
with it must then be read again alone, and only that prompt fail); `loop=TEXT` makes the engine loop itself
raise when it admits such a prompt (the process must then exit non-zero). Several may be given, separated by `;`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from server.engine_request import EngineRequest

VARIABLE = "WINDOWLM_INJECT_FAULTS"


class InjectedFault(RuntimeError):
    """A failure made on purpose by a test."""


@dataclass(frozen=True)
class FaultInjector:
    row_marker: bytes | None = None
    loop_marker: bytes | None = None
    chunk_marker: bytes | None = None

    @classmethod
    def from_environment(cls) -> FaultInjector | None:
        text = os.environ.get(VARIABLE)
        if not text:
            return None
        parts = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
        markers = [parts.get(name) for name in ("row", "loop", "chunk")]
        return cls(*(marker.encode() if marker else None for marker in markers))

    def check_step(self, requests: Iterable[EngineRequest]) -> None:
        """Raise when a row of this step carries the row marker."""
        if self.row_marker is not None and any(self.row_marker in bytes(r.prompt) for r in requests):
            raise InjectedFault("injected fault in a decode step")

    def check_prompt_chunks(self, requests: Iterable[EngineRequest]) -> None:
        """Raise when a prompt chunk of this read belongs to a prompt carrying the chunk marker."""
        if self.chunk_marker is not None and any(self.chunk_marker in bytes(r.prompt) for r in requests):
            raise InjectedFault("injected fault in a prompt read")

    def check_admission(self, request: EngineRequest) -> None:
        """Raise, outside every per-request guard, when an admitted request carries the loop marker."""
        if self.loop_marker is not None and self.loop_marker in bytes(request.prompt):
            raise InjectedFault("injected fault in the engine loop")
