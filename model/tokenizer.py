"""The byte-level tokenizer of local-attention's language model, and a streaming UTF-8 decoder.

The vocabulary is the 256 byte values: a token id is one byte of the UTF-8 encoding of the text. A model
can emit any byte sequence, so decoding never raises on bad bytes; each invalid or truncated sequence
becomes U+FFFD, exactly as `bytes(ids).decode("utf-8", errors="replace")` does.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

VOCAB_SIZE = 256
REPLACEMENT_CHAR = "\ufffd"


def _check_ids(ids: Iterable[int]) -> None:
    """Raise ValueError naming the first id that is not a byte value."""
    for position, token_id in enumerate(ids):
        if not 0 <= token_id < VOCAB_SIZE:
            raise ValueError(
                f"token id {token_id} at position {position} is outside the byte vocabulary 0..{VOCAB_SIZE - 1}"
            )


class ByteTokenizer:
    """Text <-> token ids, one token per UTF-8 byte."""

    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; invalid UTF-8 becomes U+FFFD. Ids outside 0..255 raise ValueError."""
        _check_ids(ids)
        return bytes(ids).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever emitting half a character.

    `push` returns the text completed by one more byte and holds back an unfinished multibyte sequence;
    `flush` ends the stream, turning an unfinished tail into U+FFFD. The concatenation of every `push`
    output and `flush` equals the one-shot `ByteTokenizer.decode` of the same ids, for any byte sequence.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        _check_ids((token_id,))
        return self._decoder.decode(bytes((token_id,)))

    def flush(self) -> str:
        """Return what is held back (an incomplete tail becomes U+FFFD) and reset for a new stream."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> int:
        """How many bytes are held back waiting for the rest of their character."""
        buffered, _ = self._decoder.getstate()
        return len(buffered)
