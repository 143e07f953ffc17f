"""Token ids to a choice's text, without a model: logprob token texts, text offsets, stop sequences, the text
held back until the sequence ends, min_tokens, and an echoed prompt with its scores."""

from __future__ import annotations

from server.choices import LOWEST_LOGPROB, ChoiceDelta, ChoiceText, token_text
from server.engine_request import PromptLogprobsEvent, TokenEvent
from server.routes.completions import completion_logprobs


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
        choice.on_finish(delta)
        deltas.append(delta)
    return deltas


def offsets(deltas: list[ChoiceDelta]) -> list[int]:
    return [entry.text_offset for delta in deltas for entry in delta.logprobs]


def test_token_texts_of_logprobs() -> None:
    assert token_text(ord("a")) == "a" and token_text(0x0A) == "\n" and token_text(0x7F) == "\x7f"
    assert token_text(0x80) == "bytes:\\x80" and token_text(0xC3) == "bytes:\\xc3"
    [delta] = feed(ChoiceText(0, [], logprobs=2), b"a")
    logprobs = completion_logprobs(delta.logprobs)
    assert logprobs.tokens == ["a"] and logprobs.token_logprobs == [-1.0]
    assert logprobs.top_logprobs == [{"a": -1.0, "bytes:\\x80": LOWEST_LOGPROB}]


def test_the_sampled_token_is_always_among_the_top_logprobs() -> None:
    choice = ChoiceText(0, [], logprobs=1)
    delta = ChoiceDelta(0)
    choice.on_token(TokenEvent(ord("z"), -3.5, [(ord("a"), -0.1)]), delta)  # z was sampled, a is the most likely
    assert completion_logprobs(delta.logprobs).top_logprobs == [{"a": -0.1, "z": -3.5}]
    delta = ChoiceDelta(0)
    ChoiceText(0, [], logprobs=0).on_token(TokenEvent(ord("z"), -3.5, []), delta)  # logprobs: 0
    assert completion_logprobs(delta.logprobs).top_logprobs == [{"z": -3.5}]


def test_text_offsets_count_characters_after_the_echo() -> None:
    text = "hé→x".encode()  # 1 + 2 + 3 + 1 bytes: every byte of a character has the character's offset
    choice = ChoiceText(0, [], logprobs=0, echo=list(b"echo"))
    assert choice.opening().text == "echo"
    deltas = feed(choice, text)
    assert offsets(deltas) == [4, 5, 5, 6, 6, 6, 7]
    assert "".join(delta.text for delta in deltas) == "hé→x"


def test_text_held_back_by_a_possible_stop_keeps_its_offsets_and_its_logprobs_wait_with_it() -> None:
    choice = ChoiceText(0, ["abc"], logprobs=0)
    deltas = feed(choice, b"xabyz")
    assert [delta.text for delta in deltas] == ["x", "", "", "aby", "z"]  # "ab" waited for a possible "c"
    assert [[entry.text_offset for entry in delta.logprobs] for delta in deltas] == [[0], [], [], [1, 2, 3], [4]]


def test_the_tokens_of_a_stop_sequence_leave_out_their_logprobs_as_the_text_does() -> None:
    choice = ChoiceText(0, ["\n\n"], logprobs=0)
    deltas = feed(choice, b"ab\n\ncd")
    assert "".join(delta.text for delta in deltas) == "ab"
    assert [chr(entry.token) for delta in deltas for entry in delta.logprobs] == ["a", "b"]


def test_bad_bytes_take_the_offset_of_the_replacement_character_they_become() -> None:
    choice = ChoiceText(0, [], logprobs=0, echo=[97, 0xC3, 98, 99], prompt_logprobs=True)
    [delta] = feed(choice, b"x")
    assert delta.text == "a\ufffdbcx"
    assert offsets([delta]) == [0, 1, 2, 3, 4]  # the lone 0xC3 is the U+FFFD at 1, "b" follows it at 2


def test_a_stop_sequence_ends_the_choice_without_its_text() -> None:
    choice = ChoiceText(0, ["bc"])
    deltas = feed(choice, b"abcd")
    assert "".join(delta.text for delta in deltas) == "a"
    assert choice.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    assert choice.completion_tokens == 3


def test_the_text_held_back_is_released_at_a_length_finish() -> None:
    choice = ChoiceText(0, ["xyz"])
    deltas = feed(choice, b"abxy", length_finish=True)
    assert [delta.text for delta in deltas] == ["a", "b", "", "", "xy"]
    assert choice.finish_reason == "length" and deltas[-1].finish_reason == "length"


def test_half_a_character_at_a_length_finish_becomes_a_replacement_character() -> None:
    choice = ChoiceText(0, [])
    deltas = feed(choice, [ord("a"), 0xE2, 0x86], length_finish=True)
    assert "".join(delta.text for delta in deltas) == "a\ufffd"


def test_a_stop_completed_by_the_flush_at_a_length_finish_is_a_stop() -> None:
    choice = ChoiceText(0, ["a\ufffd"])
    deltas = feed(choice, [ord("a"), 0xE2], length_finish=True)
    assert "".join(delta.text for delta in deltas) == ""
    assert choice.finish_reason == "stop"


def test_no_stop_sequence_ends_a_choice_within_min_tokens() -> None:
    choice = ChoiceText(0, ["ab"], min_tokens=3)
    deltas = feed(choice, b"ababab")
    # "ab" at tokens 1-2 is text; the matcher sees only "bab", from token 4 on, and stops at tokens 5-6
    assert "".join(delta.text for delta in deltas) == "abab"
    assert choice.finish_reason == "stop" and choice.completion_tokens == 6


def test_an_echoed_prompt_comes_first_and_offsets_continue_after_it() -> None:
    choice = ChoiceText(0, [], logprobs=0, echo=list("hé".encode()))
    opening = choice.opening()
    assert opening.text == "hé" and opening.logprobs == []  # no scores asked for: the prompt is text only
    assert offsets(feed(choice, b"xy")) == [2, 3]


def test_an_echoed_prompt_with_scores_goes_out_as_they_arrive() -> None:
    prompt = list("aé!".encode())  # 4 tokens; the first has no logprob
    choice = ChoiceText(0, [], logprobs=1, echo=prompt, prompt_logprobs=True)
    assert not choice.opening().changed  # the prompt waits for its scores
    first, second = ChoiceDelta(0), ChoiceDelta(0)
    choice.on_prompt_logprobs(PromptLogprobsEvent(1, [-1.0, -2.0], [[(1, -0.5)], [(2, -0.5)]]), first)
    choice.on_prompt_logprobs(PromptLogprobsEvent(3, [-3.0], [[(3, -0.5)]]), second)
    assert first.text + second.text == "aé!"
    scored = completion_logprobs(first.logprobs + second.logprobs)
    assert scored.token_logprobs == [None, -1.0, -2.0, -3.0] and scored.top_logprobs[0] is None
    assert scored.top_logprobs[1] == {"\x01": -0.5, "bytes:\\xc3": -1.0}
    assert scored.text_offset == [0, 1, 1, 2]
    assert offsets(feed(choice, b"x")) == [3]  # the completion goes on after the prompt


def test_a_one_token_prompt_with_scores_is_echoed_with_its_first_token() -> None:
    choice = ChoiceText(0, [], logprobs=0, echo=[ord("a")], prompt_logprobs=True)
    [delta] = feed(choice, b"b")
    assert delta.text == "ab"
    assert completion_logprobs(delta.logprobs).token_logprobs == [None, -1.0]
