"""Prompt scoring over HTTP: `echo` + `logprobs` with `max_tokens: 0` gives every prompt token's logprob (the
first null), as evaluation harnesses use the completions API for loglikelihood and perplexity. The bits per
byte it gives for a text are those `weights` evaluation computes for the same bytes."""

from __future__ import annotations

import math

import openai
import pytest

from server.config import BUNDLED_WEIGHTS
from tests.server.conftest import TEST_MODEL, ServerProcess
from weights.evaluate import evaluate_bits_per_byte
from weights.io import load_checkpoint

TEXT = """KING OF NAPLES:
What ails the tide, that it returns so soon
And leaves the harbour empty of its ships?

FIRST SAILOR:
My lord, the wind came round before the dawn,
And every mast we had stood bare as winter.
We lost the light, and then we lost the shore.

KING OF NAPLES:
Then bring me word when any sail is seen,
And let no man go sleeping till it come.

"""


def test_scored_prompt_gives_the_bits_per_byte_of_weights_evaluation(bundled: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{bundled.url}/v1", api_key="unused", max_retries=0)
    scored = client.completions.create(model=TEST_MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=1)
    [choice] = scored.choices
    assert choice.text == TEXT and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(TEXT.encode()) and logprobs.token_logprobs[0] is None
    bits_per_byte = -sum(logprobs.token_logprobs[1:]) / math.log(2) / (len(TEXT.encode()) - 1)

    model, _ = load_checkpoint(BUNDLED_WEIGHTS)
    expected = evaluate_bits_per_byte(model, TEXT.encode(), seq_len=len(TEXT))
    assert bits_per_byte == pytest.approx(expected, abs=1e-3)
    assert bits_per_byte < 4  # a model that knows the language, not a uniform one (8 bits)


def test_scored_tokens_carry_offsets_and_their_own_logprob_among_the_top(bundled: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{bundled.url}/v1", api_key="unused", max_retries=0)
    prompt = "Fair é!"
    scored = client.completions.create(model=TEST_MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=2, seed=1)
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text.startswith(prompt)
    assert logprobs.text_offset[:8] == [0, 1, 2, 3, 4, 5, 5, 6]  # é is two bytes at one character's offset
    assert logprobs.top_logprobs[0] is None
    rows = zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True)
    for token, logprob, top in rows:
        assert top[token] == logprob and 2 <= len(top) <= 3
    assert len(logprobs.tokens) == len(prompt.encode()) + 3
    assert logprobs.text_offset[8:] == sorted(logprobs.text_offset[8:]) and logprobs.text_offset[8] == len(prompt)
