"""Token ids to a choice's text, without a model: logprob token texts, text offsets, stop sequences, and the
text held back until the sequence ends."""

from __future__ import annotations

from server.choices import LOWEST_LOGPROB, ChoiceDelta, ChoiceText, token_text
from server.engine_request import TokenEvent


def feed(choice: ChoiceText, text: bytes | list[int], length_finish: bool = False) -> list[ChoiceDelta]:
    deltas = []
    for token in text:
        delta = ChoiceDelta(choice.index)
        choice.on_token(TokenEvent(token, -1.0, [(token, -1.0), (0x80, float("-inf"))]), delta)
        deltas.append(delta)
        if choice.finish_reason is not None:
            return deltas
    if length_finish:
        delta = ChoiceDelta(choice.index)
        choice.on_length(delta)
        deltas.append(delta)
    return deltas


def offsets(deltas: list[ChoiceDelta]) -> list[int]:
    return [offset for delta in deltas if delta.logprobs for offset in delta.logprobs.text_offset]


def test_token_texts_of_logprobs() -> None:
    assert token_text(ord("a")) == "a" and token_text(0x0A) == "\n" and token_text(0x7F) == "\x7f"
    assert token_text(0x80) == "bytes:\\x80" and token_text(0xC3) == "bytes:\\xc3"
    [delta] = feed(ChoiceText(0, [], want_logprobs=True), b"a")
    assert delta.logprobs.tokens == ["a"] and delta.logprobs.token_logprobs == [-1.0]
    assert delta.logprobs.top_logprobs == [{"a": -1.0, "bytes:\\x80": LOWEST_LOGPROB}]


def test_text_offsets_count_characters_after_the_echo() -> None:
    text = "hé→x".encode()  # 1 + 2 + 3 + 1 bytes: every byte of a character has the character's offset
    deltas = feed(ChoiceText(0, [], want_logprobs=True, text_offset=len("echo")), text)
    assert offsets(deltas) == [4, 5, 5, 6, 6, 6, 7]
    assert "".join(delta.text for delta in deltas) == "hé→x"


def test_text_held_back_by_a_possible_stop_keeps_its_offsets() -> None:
    choice = ChoiceText(0, ["abc"], want_logprobs=True)
    deltas = feed(choice, b"xabyz")
    assert [delta.text for delta in deltas] == ["x", "", "", "aby", "z"]  # "ab" waited for a possible "c"
    assert offsets(deltas) == [0, 1, 2, 3, 4]


def test_a_stop_sequence_ends_the_choice_without_its_text() -> None:
    choice = ChoiceText(0, ["bc"], want_logprobs=False)
    deltas = feed(choice, b"abcd")
    assert "".join(delta.text for delta in deltas) == "a"
    assert choice.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    assert choice.completion_tokens == 3


def test_the_text_held_back_is_released_at_a_length_finish() -> None:
    choice = ChoiceText(0, ["xyz"], want_logprobs=False)
    deltas = feed(choice, b"abxy", length_finish=True)
    assert [delta.text for delta in deltas] == ["a", "b", "", "", "xy"]
    assert choice.finish_reason == "length" and deltas[-1].finish_reason == "length"


def test_half_a_character_at_a_length_finish_becomes_a_replacement_character() -> None:
    choice = ChoiceText(0, [], want_logprobs=False)
    deltas = feed(choice, [ord("a"), 0xE2, 0x86], length_finish=True)
    assert "".join(delta.text for delta in deltas) == "a\ufffd"


def test_a_stop_completed_by_the_flush_at_a_length_finish_is_a_stop() -> None:
    choice = ChoiceText(0, ["a\ufffd"], want_logprobs=False)
    deltas = feed(choice, [ord("a"), 0xE2], length_finish=True)
    assert "".join(delta.text for delta in deltas) == ""
    assert choice.finish_reason == "stop"
