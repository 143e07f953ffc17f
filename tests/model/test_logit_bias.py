"""logit_bias: added to the penalised logits before the clamp, temperature and filters; -100 bans a token; the
reported logprobs stay those of the raw logits; rows without a bias are untouched, bit for bit.

test_sampling_reference.py checks the bias within the whole chain against an independent reference."""

import math

import pytest
import torch

from model.sampling import (
    FLOAT32_MAX,
    SamplingError,
    SamplingParams,
    SequenceSampler,
    process_logits,
    sample_batch,
)

V = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sampler(vocab: int = V, **kwargs: object) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**kwargs), vocab)  # type: ignore[arg-type]


def random_logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # (B, V)


def test_a_bias_of_100_forces_an_unlikely_token() -> None:
    logits = random_logits(1).expand(200, V)  # (200, V), the same logits for 200 seeds
    low = int(logits[0].argmin())
    samplers = [sampler(logit_bias=((low, 100),), seed=seed) for seed in range(200)]
    for _ in range(3):
        assert sample_batch(logits, samplers).tokens.tolist() == [low] * 200
    greedy = sample_batch(logits[:1], [sampler(temperature=0, logit_bias=((low, 100.0),))])
    assert greedy.tokens.tolist() == [low]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"temperature": 0},
        {"temperature": 0.05},
        {"top_k": 1},
        {"top_p": 1e-6},
        {"min_p": 1.0},
        {"filter_thres": 0.99},
        {"repetition_penalty": 0.5, "presence_penalty": -2.0},  # would push the best token further up
    ],
)
def test_a_bias_of_minus_100_bans_the_best_token(params: dict[str, float]) -> None:
    """The banned argmax is never drawn; filters that keep only the best keep the best token left."""
    logits = random_logits(1, seed=1)
    logits[0, 5] = logits[0].max() + 20  # (1, V) token 5 would win nearly always
    second = int(logits[0].topk(2).indices[1])
    samplers = [sampler(logit_bias=((5, -100),), seed=seed, **params) for seed in range(100)]
    for s in samplers:
        s.observe_prompt([5])
    distribution = process_logits(logits, samplers[:1])  # (1, V) before any token is counted
    assert distribution[0, 5] == -math.inf
    assert distribution[0, second] == 0  # the filters measure from the best token that is left
    only_the_best = params.get("temperature") == 0 or set(params) & {"top_k", "top_p", "min_p", "filter_thres"}
    for _ in range(3):
        tokens = sample_batch(logits.expand(100, V), samplers).tokens.tolist()  # (100,)
        assert 5 not in tokens
        if only_the_best:
            assert tokens == [second] * 100
    if only_the_best:
        assert distribution.isfinite().sum() == 1


def test_the_bias_changes_sampling_but_not_the_reported_logprobs() -> None:
    logits = random_logits(1, seed=2)  # (1, V)
    ranked = logits[0].argsort(descending=True)
    bias = (*((int(token), -20.0) for token in ranked[:8]), (int(ranked[-1]), 15.0))
    plain = [sampler(seed=seed, logprobs=5) for seed in range(40)]
    biased = [sampler(seed=seed, logprobs=5, logit_bias=bias) for seed in range(40)]
    expected = torch.log_softmax(logits, -1)[0]  # (V,) the raw logprobs
    plain_result = sample_batch(logits.expand(40, V), plain)
    biased_result = sample_batch(logits.expand(40, V), biased)
    assert plain_result.tokens.tolist() != biased_result.tokens.tolist()
    assert set(biased_result.tokens.tolist()).isdisjoint(ranked[:8].tolist())
    torch.testing.assert_close(biased_result.logprobs, expected[biased_result.tokens])
    assert biased_result.top_logprobs == plain_result.top_logprobs  # raw: the biased-down best tokens lead
    assert [token for token, _ in biased_result.top_logprobs[0]] == ranked[:5].tolist()


def test_the_bias_comes_after_the_penalties_and_before_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0]])  # (1, 4)
    s = sampler(4, temperature=2.0, repetition_penalty=2.0, logit_bias=((0, 1.0), (2, -0.5), (3, -100)))
    s.observe_prompt([0])
    expected = torch.tensor([(2 / 2 + 1) / 2, 0.0, -0.5 / 2, -math.inf]) - 1.0  # shifted: the best is 0
    torch.testing.assert_close(process_logits(logits, [s])[0], expected)


def test_the_bias_stays_within_the_float32_range() -> None:
    logits = torch.tensor([[FLOAT32_MAX, -FLOAT32_MAX, 0.0, -math.inf]])  # (1, 4)
    up = sampler(4, temperature=0, logit_bias=((0, 100), (3, 100)))  # a masked token stays masked
    down = sampler(4, temperature=0, logit_bias=((0, -99.5), (1, -100.0), (2, -100)))
    result = sample_batch(logits.expand(2, 4), [up, down])
    assert result.errors == [None, None]
    assert result.tokens.tolist() == [0, 0]  # FLOAT32_MAX - 99.5 rounds to FLOAT32_MAX in float32
    assert process_logits(logits, [up])[0].tolist() == [0.0, -math.inf, -math.inf, -math.inf]


def test_a_row_with_only_banned_tokens_left_fails_alone() -> None:
    logits = random_logits(2, vocab=4, seed=3)
    logits[0, 2:] = -math.inf  # (2, 4) masked; the bias bans the rest
    samplers = [sampler(4, seed=0, logit_bias=((0, -100), (1, -100)), logprobs=2), sampler(4, seed=1)]
    result = sample_batch(logits, samplers)
    assert result.tokens[0] == -1
    assert result.errors[0] is not None and "banned by logit_bias" in result.errors[0]
    assert result.top_logprobs[0] == []
    assert result.errors[1] is None
    assert result.tokens[1] == sample_batch(logits[1:], [sampler(4, seed=1)]).tokens[0]
    assert process_logits(logits[:1], samplers[:1]).isneginf().all()


def test_biased_and_unbiased_rows_sample_alone_as_in_a_batch() -> None:
    """Each row, seeded, greedy or penalised, gets the same tokens and logprobs alone as beside others."""
    configs = [
        {"seed": 1, "temperature": 0.9, "logit_bias": ((3, 5.0), (7, -100), (11, -3.5))},
        {"seed": 2, "top_p": 0.8},
        {"temperature": 0, "logit_bias": ((0, 2.5), (1, -100))},
        {"seed": 3, "min_p": 0.05, "repetition_penalty": 1.3, "logit_bias": tuple((i, -100) for i in range(0, V, 3))},
        {"seed": 4, "frequency_penalty": 0.7, "top_k": 20},
    ]
    batched = [sampler(**config) for config in configs]
    alone = [sampler(**config) for config in configs]
    for step in range(30):
        logits = random_logits(len(configs), seed=100 + step)  # (5, V)
        batch = sample_batch(logits, batched)
        for row, s in enumerate(alone):
            solo = sample_batch(logits[row : row + 1], [s])
            assert int(solo.tokens[0]) == int(batch.tokens[row]), (step, row)
            assert float(solo.logprobs[0]) == float(batch.logprobs[row])
        assert 7 not in batch.tokens[:1].tolist() and 1 not in batch.tokens[2:3].tolist()
        assert int(batch.tokens[3]) % 3 != 0
    for s, solo in zip(batched, alone, strict=True):
        assert torch.equal(s.output_counts, solo.output_counts)


def test_rows_without_a_bias_are_bit_identical_beside_a_biased_row() -> None:
    logits = -random_logits(2, seed=4).abs() - 1  # (2, V) all below -1 but for two best tokens, tied at zero:
    logits[:, 1], logits[:, 2] = 0.0, -0.0  # shifted by the best, -0.0 stays -0.0 only if nothing touched it
    plain = [sampler(seed=4, temperature=0.7, top_k=40), sampler(seed=5, presence_penalty=1.0)]
    beside = [sampler(seed=4, temperature=0.7, top_k=40), sampler(seed=5, presence_penalty=1.0)]
    biased = sampler(seed=6, logit_bias=((0, -100), (3, 1.5)))
    alone = process_logits(logits, plain)  # (2, V)
    mixed = process_logits(torch.cat([logits, logits[:1]]), [*beside, biased])  # (3, V)
    assert torch.equal(alone.view(torch.int32), mixed[:2].view(torch.int32))
    assert torch.equal(
        sample_batch(logits, plain).tokens, sample_batch(torch.cat([logits, logits[:1]]), [*beside, biased]).tokens[:2]
    )


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        (((-1, 1.0),), "token ids must be integers >= 0, got -1"),
        (((True, 1.0),), "token ids must be integers >= 0, got True"),
        (((2.0, 1.0),), "token ids must be integers >= 0, got 2.0"),
        (((3, 100.5),), r"the bias of token 3 must be in \[-100, 100\], got 100.5"),
        (((3, -100.5),), "got -100.5"),
        (((4, math.nan),), "the bias of token 4 .* got nan"),
        (((4, math.inf),), "got inf"),
        (((4, "1"),), "got '1'"),
        (((5, 1.0), (6, 2.0), (5, -1.0)), "token 5 is given twice"),
        (((5, 1.0, 2.0),), r"must be \(token id, bias\) pairs"),
        ({5: 1.0}, "must be a tuple of"),
    ],
)
def test_validate_refuses_bad_biases(bias: object, message: str) -> None:
    params = SamplingParams(logit_bias=bias)  # type: ignore[arg-type]
    with pytest.raises(SamplingError, match=message) as error:
        params.validate()
    assert error.value.param == "logit_bias"


def test_the_sampler_checks_the_bias_against_its_vocabulary() -> None:
    SamplingParams(logit_bias=((V, 1.0),)).validate()  # no vocabulary yet: any id >= 0
    with pytest.raises(SamplingError, match=f"token {V} is not in the vocabulary of {V}") as error:
        sampler(logit_bias=((1, 1.0), (V, 1.0)))
    assert error.value.param == "logit_bias"
    banned = tuple((token, -100) for token in range(4))
    with pytest.raises(SamplingError, match="bans all 4 tokens") as error:
        sampler(4, logit_bias=banned)
    assert error.value.param == "logit_bias"
    s = sampler(4, logit_bias=(*banned[:3], (3, -99.9)))  # a token left, however unlikely
    assert sample_batch(torch.zeros(1, 4), [s]).tokens.tolist() == [3]
    assert sampler(logit_bias=((0, -100), (1, 100), (2, 0))).bias is not None
    assert sampler().bias is None


def test_seeds_are_signed_64_bit() -> None:
    for seed in (2**63, 2**64 - 1, -(2**63) - 1):
        with pytest.raises(SamplingError, match="a signed 64-bit integer") as error:
            SamplingParams(seed=seed).validate()
        assert error.value.param == "seed"
    assert sampler(seed=-(2**63)).seed == 2**63  # torch's unsigned seed: seed % 2**64
    assert sampler(seed=2**63 - 1).seed == 2**63 - 1
    assert sampler(seed=-1).seed == 2**64 - 1
    logits = random_logits(1, seed=5)
    low, high = sampler(seed=-(2**63)), sampler(seed=2**63 - 1)
    assert [int(sample_batch(logits, [low]).tokens[0]) for _ in range(20)] != [
        int(sample_batch(logits, [high]).tokens[0]) for _ in range(20)
    ]
