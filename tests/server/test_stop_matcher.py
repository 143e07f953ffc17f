"""StopMatcher finds stop strings across pushes and never emits any part of them."""

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.stop_matcher import StopMatcher


def run(stop: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    """Push every piece (until a stop); return the emitted pieces, flush included, and whether it stopped."""
    matcher = StopMatcher(stop)
    emitted = []
    for piece in pieces:
        out, stopped = matcher.push(piece)
        emitted.append(out)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def first_stop(stop: list[str], text: str) -> tuple[int, int] | None:
    """(start, end) of the stop string that is completed first in text, the longest on a tie; None if none is."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stop if text[:end].endswith(s)]
        if ending:
            return end - max(map(len, ending)), end
    return None


def held_back(stop: list[str], text: str) -> int:
    """Length of the longest tail of text that is still the beginning of some stop string (not all of one)."""
    return max(
        (
            length
            for length in range(1, len(text) + 1)
            for s in stop
            if len(s) > length and s.startswith(text[-length:])
        ),
        default=0,
    )


def test_stop_inside_one_push() -> None:
    assert run(["END"], ["hello END world"]) == (["hello "], True)


def test_stop_spanning_two_pushes_is_never_emitted() -> None:
    emitted, stopped = run(["END"], ["hello E", "ND world"])
    assert stopped
    assert emitted == ["hello ", ""]


def test_stop_spanning_three_pushes() -> None:
    emitted, stopped = run(["<|end|>"], ["ok <|", "en", "d|> more"])
    assert stopped
    assert emitted == ["ok ", "", ""]


def test_false_start_is_released_when_it_cannot_match() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.push("ab") == ("", False)
    assert matcher.push("x") == ("abx", False)
    assert matcher.push("ab") == ("", False)
    assert matcher.push("abc") == ("ab", True)


def test_overlapping_candidate_keeps_the_longest_possible_start() -> None:
    matcher = StopMatcher(["aab"])
    assert matcher.push("xa") == ("x", False)
    assert matcher.push("a") == ("", False)
    assert matcher.push("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert matcher.push("b") == ("", True)


def test_self_overlapping_stop() -> None:
    assert run(["abab"], ["ab", "ab", "ab"])[0] == ["", ""]
    assert run(["abab"], ["aba", "c"]) == (["", "abac", ""], False)


def test_earliest_stop_in_the_text_wins() -> None:
    assert run(["world", "hello"], ["say hello world"]) == (["say "], True)
    assert run(["world", "hello"], ["say hel", "lo wor", "ld"]) == (["say ", ""], True)


def test_stop_completed_first_wins_regardless_of_list_order() -> None:
    assert run(["abcd", "bc"], ["abcd"]) == (["a"], True)
    assert run(["abcd", "bc"], ["a", "b", "c", "d"]) == (["", "", "a"], True)


def test_no_stop_flush_returns_the_held_text() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("the end ST") == ("the end ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_pushes_after_a_stop_emit_nothing() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("ax") == ("a", True)
    assert matcher.stopped
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_pass_text_through() -> None:
    assert run([], ["a", "b"]) == (["a", "b", ""], False)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


def test_a_bare_string_is_rejected() -> None:
    with pytest.raises(TypeError):
        StopMatcher("stop")  # type: ignore[arg-type]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """(stop strings, pieces) over a small alphabet. Stop strings are new, or a prefix, a suffix or the inside of
    an earlier one, so they overlap and contain one another; the text strings together random bits, whole stop
    strings and false starts (beginnings of stop strings), so stop strings occur, often more than one close
    together; it is cut at random points (empty pieces too), many or few (so one push can complete two)."""
    alphabet = draw(st.sampled_from(["ab", "abc", "abcd"]))
    some_text = st.text(alphabet=alphabet, min_size=3, max_size=6)
    stop: list[str] = []
    for _ in range(draw(st.sampled_from([0, 1, 2, 2, 3, 3, 4]))):
        whole = draw(st.sampled_from(stop)) if stop else ""
        kinds = ["new", "prefix", "suffix", "inside"][: 1 + 2 * (len(whole) >= 2) + (len(whole) >= 3)]
        kind = draw(st.sampled_from(kinds))
        if kind == "new":
            stop.append(draw(some_text))
        else:  # a prefix, a suffix or the inside of an earlier one: they overlap or contain one another
            start = 0 if kind == "prefix" else draw(st.integers(1, len(whole) - 1 - (kind == "inside")))
            end = len(whole) if kind == "suffix" else draw(st.integers(start + 1, len(whole) - 1))
            stop.append(whole[start:end])
    false_starts = [s[:end] for s in stop for end in range(1, len(s))]
    parts = [st.text(alphabet=alphabet, max_size=3)] + [st.sampled_from(s) for s in (stop, stop, false_starts) if s]
    text = "".join(draw(st.lists(st.one_of(parts), max_size=6)))
    most = draw(st.sampled_from([2, len(text) + 2]))
    bounds = [0, *sorted(draw(st.lists(st.integers(0, len(text)), max_size=most))), len(text)]
    return stop, [text[a:b] for a, b in pairwise(bounds)]


def check_stream(stop: list[str], pieces: list[str]) -> None:
    """Push the pieces one by one and compare the matcher with the reference after every push."""
    text = "".join(pieces)
    found = first_stop(stop, text)
    matcher = StopMatcher(stop)
    emitted = ""
    pushed = 0
    for piece in pieces:
        pushed += len(piece)
        out, stopped = matcher.push(piece)
        emitted += out
        assert matcher.stopped == stopped
        if found is not None and pushed >= found[1]:  # this push completes the first stop string
            assert stopped, (pieces, emitted)
            assert emitted == text[: found[0]], pieces
            assert matcher.push("abcd") == ("", True)
            assert matcher.flush() == ""
            return
        assert not stopped, (pieces, emitted)
        assert emitted == text[: pushed - held_back(stop, text[:pushed])], (pieces, emitted)
    assert found is None
    assert emitted + matcher.flush() == text
    assert matcher.flush() == ""


@given(streams())
def test_streaming_matches_a_plain_reference_push_by_push(case: tuple[list[str], list[str]]) -> None:
    """After every push, what was emitted is the text so far less exactly the longest tail that could still begin
    a stop string; the push that completes the first stop string (the earliest to end, the longest on a tie)
    stops, having emitted everything before it and nothing of it; a stream without one is all emitted by flush.
    The same text, and the stop strings strung together, are also pushed one character at a time (every stop
    string straddling a boundary), and each of their suffixes in one push (the rule depends only on the text).

    Catches: holding back one character too few (or too many), picking the stop string that starts first
    instead of the one that ends first, or the shorter one on a tie, searching only the new piece (missing a
    stop string that straddles the held-back boundary), and holding back only prefixes of the first stop string.
    """
    stop, pieces = case
    check_stream(stop, pieces)
    for text in ("".join(pieces), "".join(stop)):  # the stop strings strung together: each of them occurs
        check_stream(stop, list(text))
        for start in range(len(text)):  # each suffix in one push: more ways for stop strings to meet at its start
            check_stream(stop, [text[start:]])
