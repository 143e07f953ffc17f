"""The runner samples unconstrained rows as a batch of their own: a constrained row beside them changes none of
their tokens or logprobs, bit for bit; constrained rows get only what their grammars allow, and a grammar that
fails fails its request as the request's own fault."""

from __future__ import annotations

import pytest
import torch

from model.grammar import GrammarSpec, compile_grammar
from model.sampling import SamplingParams
from server.engine_request import EngineRequest
from server.runner import ModelRunner
from server.scheduler import StepOutput
from tests.server.conftest import make_checkpoint
from weights.io import load_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder = make_checkpoint(tmp_path_factory.mktemp("runner") / "ckpt", use_abs_pos_emb=False, max_seq_len=1)
    return load_checkpoint(folder)[0]


def request(params: SamplingParams, grammar=None) -> EngineRequest:
    return EngineRequest([65, 66], params, 16, None, None, grammar=grammar)


def sample(model, requests: list[EngineRequest], logits: torch.Tensor) -> StepOutput:
    runner = ModelRunner(model, num_slots=len(requests))
    for slot, one in enumerate(requests):
        runner.start(slot, one)
    output = StepOutput()
    runner.sample(list(range(len(requests))), logits, output)
    return output


def test_unconstrained_rows_are_what_they_are_without_the_constrained_ones(model) -> None:
    digits = compile_grammar(GrammarSpec("regex", "[0-9]+"))
    seeded, greedy = SamplingParams(temperature=1.0, seed=5, logprobs=3), SamplingParams(temperature=0, logprobs=3)
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    mixed = sample(model, [request(seeded), request(seeded, digits), request(greedy), request(greedy, digits)], logits)
    plain = sample(model, [request(seeded), request(greedy)], logits[[0, 2]])
    by_slot = {token.slot: token for token in mixed.sampled}
    assert (by_slot[0].token, by_slot[0].logprob, by_slot[0].top_logprobs) == (
        plain.sampled[0].token,
        plain.sampled[0].logprob,
        plain.sampled[0].top_logprobs,
    )
    assert (by_slot[2].token, by_slot[2].logprob) == (plain.sampled[1].token, plain.sampled[1].logprob)
    assert chr(by_slot[1].token).isdigit() and chr(by_slot[3].token).isdigit()


def test_a_grammar_past_its_limits_fails_its_request_as_refused(model) -> None:
    ambiguous = compile_grammar(GrammarSpec("grammar", 'start: a "y"\na: a a | "x"'))
    runner = ModelRunner(model, num_slots=2)
    runner.start(0, request(SamplingParams(temperature=0), ambiguous))
    runner.start(1, request(SamplingParams(temperature=0)))
    logits = torch.zeros(2, 256)
    logits[:, ord("x")] = 10.0  # both rows prefer "x"; the grammar's rows grow with each
    for _ in range(600):
        output = StepOutput()
        runner.sample([0, 1], logits, output)
        if output.refused:
            break
    assert list(output.refused) == [0] and "the constraint failed" in output.refused[0]
    assert [token.slot for token in output.sampled] == [1] and not output.ended and not output.errors
