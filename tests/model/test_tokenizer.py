"""The byte tokenizer and the streaming UTF-8 decoder agree with Python's one-shot decode."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.tokenizer import REPLACEMENT_CHAR, ByteTokenizer, IncrementalDecoder

TEXTS = [
    "plain ASCII text",
    "café naïve",  # 2-byte
    "€ 中文 한국어",  # 3-byte
    "𝄞 𐍈",  # 4-byte
    "emoji 🙂 family 👨‍👩‍👧 flag 🇫🇷",  # 4-byte with ZWJ and regional indicators
    "e\u0301 a\u0308 combining",  # combining marks
    "",
]


def one_shot(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def stream(ids: list[int]) -> tuple[list[str], str]:
    decoder = IncrementalDecoder()
    return [decoder.push(i) for i in ids], decoder.flush()


def test_vocab_is_the_byte_values() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.encode("aé") == [0x61, 0xC3, 0xA9]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text: str) -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_splits_a_character(text: str) -> None:
    """After every byte, the text so far is exactly the longest complete-character prefix."""
    ids = ByteTokenizer().encode(text)
    decoder = IncrementalDecoder()
    emitted = ""
    for count, token_id in enumerate(ids, start=1):
        piece = decoder.push(token_id)
        assert REPLACEMENT_CHAR not in piece
        emitted += piece
        complete = bytes(ids[: count - decoder.pending])
        assert emitted == complete.decode("utf-8")
        assert text.startswith(emitted)
    assert decoder.pending == 0
    assert decoder.flush() == ""
    assert emitted == text


def test_multibyte_character_is_held_until_complete() -> None:
    decoder = IncrementalDecoder()
    pieces = [decoder.push(b) for b in "🙂".encode()]
    assert pieces == ["", "", "", "🙂"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a\x80b", "a\ufffdb"),  # stray continuation byte
        (b"\xffa", "\ufffda"),  # invalid lead byte
        (b"\xc0\xaf", "\ufffd\ufffd"),  # overlong encoding of "/"
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # encoded surrogate
        (b"\xe2Ab", "\ufffdAb"),  # lead byte followed by a non-continuation
        (b"ok\xe2\x82", "ok\ufffd"),  # truncated tail, resolved by flush
    ],
)
def test_invalid_bytes_become_replacement_chars(data: bytes, expected: str) -> None:
    assert ByteTokenizer().decode(list(data)) == expected
    pieces, tail = stream(list(data))
    assert "".join(pieces) + tail == expected


def test_flush_starts_a_new_stream() -> None:
    decoder = IncrementalDecoder()
    decoder.push(0xE2)
    assert decoder.flush() == REPLACEMENT_CHAR
    assert decoder.push(ord("x")) == "x"
    assert decoder.flush() == ""


@pytest.mark.parametrize("bad", [256, -1, 1000])
def test_ids_outside_the_vocabulary_raise(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad} at position 1"):
        ByteTokenizer().decode([65, bad])
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        IncrementalDecoder().push(bad)


@given(st.binary(max_size=64))
def test_streaming_matches_one_shot_decode_for_any_bytes(data: bytes) -> None:
    pieces, tail = stream(list(data))
    assert "".join(pieces) + tail == one_shot(data)
    assert ByteTokenizer().decode(list(data)) == one_shot(data)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters=REPLACEMENT_CHAR), max_size=32))
def test_valid_text_streams_without_replacement_chars(text: str) -> None:
    pieces, tail = stream(ByteTokenizer().encode(text))
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) + tail == text
    assert tail == ""
