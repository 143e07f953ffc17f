"""Sampling: the filters and penalties do what their formulas say, and seeds reproduce alone or batched."""

import math
import re

import pytest
import torch

from model.sampling import (
    BatchParams,
    SamplingError,
    SamplingParams,
    SequenceSampler,
    apply_penalties,
    process_logits,
    sample_batch,
)

V = 256


def sampler(vocab: int = V, **kwargs: object) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**kwargs), vocab)  # type: ignore[arg-type]


def draw(logits: torch.Tensor, s: SequenceSampler, steps: int) -> list[int]:
    """Sample `steps` tokens for one sequence from the same logits (1, V)."""
    return [int(sample_batch(logits, [s]).tokens[0]) for _ in range(steps)]


def random_logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # (B, V)


def test_greedy_is_argmax_with_ties_to_the_lowest_id() -> None:
    logits = random_logits(4)
    logits[0, 7] = logits[0, 3] = logits[0].max() + 1  # a tie
    result = sample_batch(logits, [sampler(temperature=0) for _ in range(4)])
    assert torch.equal(result.tokens, logits.argmax(-1))
    assert int(result.tokens[0]) == 3


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"filter_thres": 0.999}])
def test_filters_at_their_limit_equal_greedy(params: dict[str, float]) -> None:
    logits = random_logits(8, seed=1)
    samplers = [sampler(seed=i, **params) for i in range(8)]
    for _ in range(5):
        assert torch.equal(sample_batch(logits, samplers).tokens, logits.argmax(-1))


def test_top_k_keeps_the_k_best() -> None:
    logits = random_logits(2, seed=2)
    kept = process_logits(logits, [sampler(top_k=10), sampler(top_k=10 * V)]).isfinite()  # (2, V)
    best = torch.zeros(V, dtype=torch.bool).index_fill(0, logits[0].topk(10).indices, True)  # (V,)
    assert torch.equal(kept[0], best)
    assert kept[1].all()


@pytest.mark.parametrize("thres", [0.0, 0.5, 0.9, 0.97])
def test_filter_thres_keeps_int_of_one_minus_thres_times_vocab(thres: float) -> None:
    logits = random_logits(3, seed=3)
    kept = process_logits(logits, [sampler(filter_thres=thres) for _ in range(3)]).isfinite()  # (3, V)
    assert (kept.sum(-1) == int((1 - thres) * V)).all()


def test_filter_thres_matches_local_attention() -> None:
    reference = pytest.importorskip("local_attention.transformer")
    logits = random_logits(3, seed=4)
    ours = process_logits(logits, [sampler(filter_thres=0.9) for _ in range(3)]).isfinite()
    assert torch.equal(ours, reference.top_k(logits, thres=0.9).isfinite())


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # (1, 5)
    probs = logits.softmax(-1)[0]  # about 0.64, 0.23, 0.09, 0.03, 0.01
    for top_p, expected in [(0.5, 1), (0.8, 2), (float(probs[:2].sum()) + 1e-3, 3), (1.0, 5)]:
        kept = process_logits(logits, [sampler(5, top_p=top_p)]).isfinite()
        assert int(kept.sum()) == expected, top_p


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_min_p_keeps_tokens_within_a_fraction_of_the_best(temperature: float) -> None:
    logits = random_logits(1, vocab=64, seed=5)
    probs = (logits / temperature).softmax(-1)  # (1, 64)
    kept = process_logits(logits, [sampler(64, min_p=0.1, temperature=temperature)]).isfinite()
    assert torch.equal(kept, probs >= 0.1 * probs.max())
    s = sampler(64, min_p=0.1, temperature=temperature, seed=0)
    assert set(draw(logits, s, 300)) <= set(kept[0].nonzero().flatten().tolist())


def test_processed_logits_are_the_tempered_distribution() -> None:
    logits = random_logits(2, vocab=16, seed=6)
    out = process_logits(logits, [sampler(16, temperature=0.5), sampler(16, temperature=2.0)])
    torch.testing.assert_close(out.softmax(-1)[0], (logits[0] / 0.5).softmax(-1))
    torch.testing.assert_close(out.softmax(-1)[1], (logits[1] / 2.0).softmax(-1))


def test_penalty_formulas() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0, 1.0]])  # (1, 6)
    seen = torch.tensor([[True, True, False, False, False, False]])  # prompt tokens 0, 1
    counts = torch.tensor([[0, 0, 0, 0, 1, 3]])  # generated: 4 once, 5 three times
    params = BatchParams.from_samplers(
        [sampler(6, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)], logits.device
    )
    out = apply_penalties(logits, seen, counts, params)
    expected = [2 / 2, -2 * 2, 2, -2, 1 / 2 - 0.5 - 0.25, 1 / 2 - 0.5 - 0.75]
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_samplers_count_prompt_and_output_for_penalties() -> None:
    s = sampler(4, temperature=0, repetition_penalty=4.0, frequency_penalty=0.5)
    s.observe_prompt([0])
    logits = torch.tensor([[4.0, 3.0, 2.5, -1.0]])  # (1, 4)
    # step 1: 0 is a prompt token, 4 / 4 = 1 < 3, so 1 wins; step 2: 1 drops to 3 / 4 - 0.5, so 2 wins;
    # step 3: 2 drops to 2.5 / 4 - 0.5 = 0.125, below token 0's 1.0
    assert draw(logits, s, 3) == [1, 2, 0]
    assert s.output_counts.tolist() == [1, 1, 1, 0]


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    logits = random_logits(1, seed=7) / 3  # (1, V), flat enough to vary
    first = draw(logits, sampler(seed=42, top_p=0.95), 50)
    again = draw(logits, sampler(seed=42, top_p=0.95), 50)
    other = draw(logits, sampler(seed=43, top_p=0.95), 50)
    assert first == again
    assert first != other


def test_seedless_samplers_get_fresh_seeds() -> None:
    assert sampler().seed != sampler().seed


def test_seeded_sequence_is_the_same_alone_and_in_a_batch() -> None:
    params = {"seed": 1234, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.3}
    alone = sampler(**params)
    batched = [
        sampler(**params),
        sampler(seed=1, temperature=1.5),
        sampler(temperature=0),
        sampler(min_p=0.2, presence_penalty=1.0),
    ]
    batched = [batched[1], batched[0], batched[2], batched[3]]  # the sequence sits in row 1
    alone.observe_prompt([5, 6, 7])
    batched[1].observe_prompt([5, 6, 7])
    for step in range(50):
        logits = random_logits(4, seed=100 + step)  # (4, V); row 1 is the sequence's
        if step % 10 == 3:
            logits[2] = math.nan  # a failing neighbour changes nothing for the others
        solo = sample_batch(logits[1:2], [alone])
        batch = sample_batch(logits, batched)
        assert int(solo.tokens[0]) == int(batch.tokens[1])
        assert float(solo.logprobs[0]) == float(batch.logprobs[1])
    assert torch.equal(alone.output_counts, batched[1].output_counts)


def test_frequencies_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])  # (1, 4)
    temperature = 0.7
    tokens = draw(logits, sampler(4, temperature=temperature, seed=2024), 2000)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=4) / len(tokens)
    torch.testing.assert_close(frequencies, (logits[0] / temperature).softmax(-1), atol=0.04, rtol=0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(math.nan, "NaN"), (math.inf, r"\+inf"), (-math.inf, "all logits are -inf")],
)
def test_a_non_finite_row_fails_alone(bad: float, message: str) -> None:
    logits = random_logits(3, seed=8)
    logits[0, 10] = -math.inf  # masked tokens in a healthy row are fine
    expected = sample_batch(logits[[0, 2]], [sampler(seed=1), sampler(seed=2)]).tokens
    if bad == -math.inf:
        logits[1] = bad
    else:
        logits[1, 17] = bad
    samplers = [sampler(seed=1), sampler(seed=2, logprobs=3), sampler(seed=2)]
    result = sample_batch(logits, samplers)
    assert result.tokens[1] == -1
    assert result.errors[0] is None and result.errors[2] is None
    assert result.errors[1] is not None
    assert result.top_logprobs[1] == []
    assert torch.equal(result.tokens[[0, 2]], expected)
    assert samplers[1].output_counts.sum() == 0
    assert int(result.tokens[0]) != 10
    assert re.search(message, result.errors[1])


def test_penalty_overflow_fails_the_row() -> None:
    s = sampler(4, repetition_penalty=1e-38)
    s.observe_prompt([0])
    result = sample_batch(torch.tensor([[1e3, 0.0, 0.0, 0.0]]), [s])
    assert result.tokens.tolist() == [-1]
    assert result.errors[0] is not None and "overflow" in result.errors[0]


def test_logprobs_come_from_the_raw_logits() -> None:
    logits = random_logits(3, seed=9).to(torch.bfloat16)  # any dtype; computed in float32
    samplers = [
        sampler(temperature=0.3, top_k=5, repetition_penalty=1.5, logprobs=5, seed=3),
        sampler(temperature=0, logprobs=0),
        sampler(logprobs=20, seed=4),
    ]
    samplers[0].observe_prompt(range(0, V, 2))
    result = sample_batch(logits, samplers)
    raw = torch.log_softmax(logits.float(), dim=-1)  # (3, V)
    torch.testing.assert_close(result.logprobs, raw.gather(1, result.tokens[:, None]).squeeze(1))
    assert [len(row) for row in result.top_logprobs] == [5, 0, 20]
    values, ids = raw[2].topk(20)
    assert [i for i, _ in result.top_logprobs[2]] == ids.tolist()
    torch.testing.assert_close(torch.tensor([v for _, v in result.top_logprobs[2]]), values)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("filter_thres", 1.0),
        ("filter_thres", -0.1),
        ("logprobs", 21),
        ("logprobs", -1),
        ("seed", 2**64),
    ],
)
def test_validate_names_the_bad_param(field: str, value: float) -> None:
    params = SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(SamplingError, match=field) as error:
        params.validate()
    assert error.value.param == field
    assert isinstance(error.value, ValueError)
    with pytest.raises(SamplingError):
        SequenceSampler(params, V)


def test_defaults_and_edges_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, filter_thres=0.0, logprobs=20, seed=-1).validate()


def test_mismatched_inputs_are_rejected() -> None:
    s = sampler()
    with pytest.raises(ValueError, match="samplers"):
        sample_batch(random_logits(2), [s])
    with pytest.raises(ValueError, match="twice"):
        sample_batch(random_logits(2), [s, s])
    with pytest.raises(ValueError, match="vocab"):
        sample_batch(random_logits(1, vocab=10), [s])
    with pytest.raises(ValueError, match="prompt token ids"):
        s.observe_prompt([V])
