"""Sampling: the filters and penalties do what their formulas say, and seeds reproduce alone or batched.

test_sampling_reference.py checks the whole chain, with the filters combined, against an independent reference."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
F32 = torch.finfo(torch.float32)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: a thread pool only adds waiting


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


def test_tiny_temperatures_are_greedy_like() -> None:
    logits = random_logits(64, seed=10)  # (64, V), a clear best token in each row
    greedy = sample_batch(logits, [sampler(temperature=0) for _ in range(64)]).tokens
    assert torch.equal(greedy, logits.argmax(-1))
    for temperature in (1e-50, 1e-40):  # 0 in float32, and a float32 subnormal
        probs = process_logits(logits[:1], [sampler(temperature=temperature)]).softmax(-1)  # (1, V)
        assert torch.equal(probs[0], torch.nn.functional.one_hot(greedy[0], V).float())
        samplers = [sampler(temperature=temperature, seed=seed) for seed in range(64)]  # a seed per row
        for _ in range(5):
            assert torch.equal(sample_batch(logits, samplers).tokens, greedy)


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"filter_thres": 0.999}])
def test_filters_at_their_limit_equal_greedy(params: dict[str, float]) -> None:
    logits = random_logits(8, seed=1)
    samplers = [sampler(seed=i, **params) for i in range(8)]
    for _ in range(5):
        assert torch.equal(sample_batch(logits, samplers).tokens, logits.argmax(-1))


def test_the_best_token_survives_a_top_p_that_is_zero_in_float32() -> None:
    logits = random_logits(1, seed=11)
    s = sampler(seed=1)
    s.params = SamplingParams(top_p=1e-46, seed=1)  # past validate(), which refuses it
    result = sample_batch(logits, [s])
    assert result.tokens.tolist() == logits.argmax(-1).tolist()
    assert result.errors == [None]
    assert process_logits(logits, [s]).isfinite().sum() == 1


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


def test_penalties_are_clamped_to_the_float32_range() -> None:
    logits = torch.tensor([[1e3, -1e3, -math.inf, 2.0]]).expand(2, 4)  # (2, 4), token 2 masked
    seen = torch.ones(2, 4, dtype=torch.bool)
    counts = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]])
    samplers = [sampler(4, repetition_penalty=F32.tiny, frequency_penalty=-2.0), sampler(4, repetition_penalty=F32.max)]
    out = apply_penalties(logits, seen, counts, BatchParams.from_samplers(samplers, logits.device))
    tiny, most = F32.tiny, F32.max
    expected = [[most, -1e3 * tiny, -math.inf, 2 / tiny], [1e3 / most, -most, -math.inf, 2 / most]]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_a_penalty_past_the_float32_range_does_not_fail_the_row() -> None:
    samplers = [
        sampler(4, temperature=0, repetition_penalty=F32.tiny),
        sampler(4, temperature=0, repetition_penalty=F32.max),
        sampler(4, repetition_penalty=F32.max, seed=0),  # a sampled row: the batch takes the filtering path
    ]
    for s in samplers:
        s.observe_prompt([0, 1, 2, 3])
    logits = torch.tensor([[1e3, 1.0, 0.0, 0.0], [-1e3, -2e3, -3e3, -4e3], [-1e3, -2e3, -3e3, -4e3]])  # (3, 4)
    result = sample_batch(logits, samplers)  # row 0: 1e3 / tiny is past float32 max; rows 1, 2: all past -max
    assert result.errors == [None, None, None]
    assert result.tokens[:2].tolist() == [0, 0]  # row 1: a four-way tie at -max, the lowest id wins


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
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", 1.0),
        ("logit_bias", ((0, 101),)),
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


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("top_p", 1e-46, "at least 1.2e-38 (the smallest normal float32), got 1e-46"),
        ("top_p", math.nextafter(F32.tiny, 0), "smallest normal float32"),
        ("repetition_penalty", 1e-39, "smallest normal float32"),
        ("repetition_penalty", 1e-46, "smallest normal float32"),
        ("repetition_penalty", 1e39, "largest"),
        ("temperature", 1e39, "at most 3.4e+38 (the largest float32), got 1e+39"),
        ("temperature", math.nextafter(F32.max, math.inf), "largest float32"),
    ],
)
def test_validate_refuses_what_float32_cannot_hold(field: str, value: float, reason: str) -> None:
    with pytest.raises(SamplingError, match=re.escape(reason)) as error:
        SamplingParams(**{field: value}).validate()  # type: ignore[arg-type]
    assert error.value.param == field


def test_defaults_and_edges_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, filter_thres=0.0, logprobs=20, seed=-1).validate()
    SamplingParams(temperature=1e-50, top_p=F32.tiny, repetition_penalty=F32.tiny).validate()
    SamplingParams(temperature=F32.max, repetition_penalty=F32.max).validate()
    SamplingParams(seed=-(2**63), logit_bias=((0, -100), (1, 100), (2, -100.0), (3, 0))).validate()
    SamplingParams(seed=2**63 - 1, logit_bias=[[7, 1e-300]]).validate()  # type: ignore[arg-type]


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


HYPOTHESIS_V = 16
FLOAT32_EDGES = [1e-50, 5e-324, 1e-46, 1e-40, F32.tiny, math.nextafter(F32.tiny, 0), math.nextafter(F32.tiny, 1)]
FLOAT32_EDGES += [0.0, 0.5, 1.0, 2.0, F32.max, math.nextafter(F32.max, 0), math.nextafter(F32.max, math.inf), 1e39]
EDGES = FLOAT32_EDGES + [-edge for edge in FLOAT32_EDGES]
ACCEPTED = {  # the ranges validate() lets through; the sampling property draws from all of them
    "temperature": (0.0, F32.max),  # temperatures that are 0 or subnormal in float32 too
    "top_p": (F32.tiny, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (F32.tiny, F32.max),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "filter_thres": (0.0, math.nextafter(1.0, 0)),
}


@given(field=st.sampled_from(sorted(ACCEPTED)), value=st.floats() | st.sampled_from(EDGES))
def test_validate_accepts_only_what_float32_holds(field: str, value: float) -> None:
    """Any double, subnormals and float32 limits included, is refused naming its field or is in its range."""
    low, high = ACCEPTED[field]
    try:
        SamplingParams(**{field: value}).validate()  # type: ignore[arg-type]
    except SamplingError as error:
        assert error.param == field
        assert not low <= value <= high
    else:
        assert low <= value <= high


def accepted(field: str) -> st.SearchStrategy[float]:
    """Every double the field accepts (subnormals included), with the float32 limits made likely."""
    low, high = ACCEPTED[field]
    return st.floats(low, high) | st.sampled_from([edge for edge in EDGES if low <= edge <= high])


BIAS = st.floats(-100, 100) | st.sampled_from([-100, -100.0, 100, 100.0, -99.99, 0.0, 5e-324])
LOGIT_BIAS = st.lists(  # (token id, bias) pairs, at most V - 1 of them, so that some token is never banned
    st.tuples(st.integers(0, HYPOTHESIS_V - 1), BIAS), max_size=HYPOTHESIS_V - 1, unique_by=lambda pair: pair[0]
).map(tuple)


@st.composite
def valid_params(draw: st.DrawFn) -> SamplingParams:
    floats = {field: draw(accepted(field)) for field in ACCEPTED if field != "filter_thres"}
    return SamplingParams(
        **floats,
        top_k=draw(st.integers(min_value=0)),
        filter_thres=draw(st.none() | accepted("filter_thres")),
        seed=draw(st.integers(-(2**63), 2**63 - 1)),
        logit_bias=draw(st.just(()) | LOGIT_BIAS),
    )


EXTREME_LOGITS = [F32.max, -F32.max, 3e38, -3e38, F32.tiny, -F32.tiny, 1e-45, 0.0, -0.0, 1.0, -1.0]
LOGIT = st.floats(-F32.max, F32.max, width=32) | st.sampled_from(EXTREME_LOGITS)
ROW = st.tuples(
    valid_params(),
    st.lists(LOGIT, min_size=HYPOTHESIS_V, max_size=HYPOTHESIS_V),  # repeated extremes make ties
    st.lists(st.integers(0, HYPOTHESIS_V - 1), max_size=HYPOTHESIS_V),  # prompt tokens, for the penalties
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=3))
def test_valid_params_never_fail_a_step_and_each_row_samples_as_alone(
    rows: list[tuple[SamplingParams, list[float], list[int]]],
) -> None:
    logits = torch.tensor([row_logits for _, row_logits, _ in rows])  # (B, 16) finite float32
    batched = [SequenceSampler(params, HYPOTHESIS_V) for params, _, _ in rows]  # validates
    alone = [SequenceSampler(params, HYPOTHESIS_V) for params, _, _ in rows]
    for (_, _, prompt), s, solo in zip(rows, batched, alone, strict=True):
        s.observe_prompt(prompt)
        solo.observe_prompt(prompt)
    for _ in range(2):  # the second step also sees the first step's counts
        result = sample_batch(logits, batched)
        assert result.errors == [None] * len(rows)
        assert ((result.tokens >= 0) & (result.tokens < HYPOTHESIS_V)).all()
        solo_tokens = [int(sample_batch(logits[row : row + 1], [s]).tokens[0]) for row, s in enumerate(alone)]
        assert result.tokens.tolist() == solo_tokens
        for (params, _, _), token in zip(rows, solo_tokens, strict=True):
            assert (token, -100) not in params.logit_bias  # banned (-100 and -100.0 compare equal)
