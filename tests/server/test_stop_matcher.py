"""StopMatcher finds stop strings across pushes and never emits any part of them."""

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


def reference(stop: list[str], text: str) -> tuple[str, bool]:
    """The text before the first stop string to be completed (the longest on a tie)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stop if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


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


@given(
    stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4),
    pieces=st.lists(st.text(alphabet="abcd", max_size=5), max_size=8),
)
def test_outputs_concatenate_to_the_text_before_the_stop(stop: list[str], pieces: list[str]) -> None:
    emitted, stopped = run(stop, pieces)
    assert ("".join(emitted), stopped) == reference(stop, "".join(pieces))
