"""Stop sequences over streamed text: emit only what can no longer turn into a stop string.

Text arrives a piece at a time (one decoded token per push). The matcher holds back the longest tail
that is still the beginning of some stop string, so a stop string split over several pushes is found and
none of it is ever emitted. As in the OpenAI API, the stop string itself is not returned.

When several stop strings match, the one that is completed first in the stream wins (on a tie, the
longer one, which starts earlier). That rule depends only on the text, not on how it was cut into pushes.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds the first stop string in a stream of text pieces."""

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a single string")
        for candidate in stop:
            if not candidate:
                raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stop))  # unique, in the caller's order
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece of text; return (text safe to emit now, whether a stop string was found).

        After a stop, every further push returns ("", True).
        """
        if self._stopped:
            return "", True
        buffer = self._held + text
        cut = self._first_stop(buffer)
        if cut is not None:
            self._held = ""
            self._stopped = True
            return buffer[:cut], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Return the held-back text when generation ends without a stop ("" after a stop)."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buffer: str) -> int | None:
        """Start index of the stop string that ends first in buffer, or None."""
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                found = (start + len(stop), start)
                if best is None or found < best:
                    best = found
        return None if best is None else best[1]

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
