"""model/sampling.py against an independent, plainly written reference of the whole sampling chain.

The reference works on one row at a time, over a list of (logit, token) pairs sorted best first, in the order the
module's docstring gives: the repetition penalty (CTRL: over prompt and output tokens, a positive logit divided, a
negative one multiplied), the presence and frequency penalties (output tokens only), logit_bias (added; -100 bans
the token), the clamp to the float32 range (masked -inf and banned tokens stay -inf), greedy argmax at
temperature 0, then temperature, top-k and filter_thres
(keep int((1 - thres) * V), as local-attention's top_k), top-p over what top-k kept, min-p (p >= min_p * p_max),
the best token always kept, and an inverse-CDF draw. It calls none of the module's helpers.

How the two are compared, and what is left to rounding:

- Penalties, bias and the shift to the best token: the module's logits are float32, so the reference rounds to float32
  after each arithmetic step (a float64 step rounded once to float32 equals the float32 step). Its scaled logits
  therefore agree with the module's, and exact ties are ties in both; among ties the lowest id ranks first (the
  module's stable sort), which decides greedy picks and the top-k boundary exactly.
- Top-p and min-p boundaries ("boundary ties"): the module sums float32 probabilities, the reference float64 ones.
  A token whose probability mass before it is within 1e-5 of top_p, or whose scaled logit is within 1e-6
  (relative) of log(min_p), may be kept or removed; every other token must be kept or removed exactly as in the
  reference. At min_p = 1 the threshold is 0 and tokens tied with the best must be kept.
- The distribution: softmax of process_logits (the module's sampling distribution) must equal the reference's
  probabilities over the same kept set.
- The draw: the module takes one float32 uniform u from each sampled row's generator per step (torch.rand(1);
  greedy rows draw nothing), seeded with seed mod 2**64, and picks the first sorted token whose cumulative weight
  exceeds u * total. The reference seeds its own generator the same way, so it draws the same u, and walks its
  float64 CDF: the module's token must be the one whose CDF interval holds u * total, or a neighbour whose
  interval comes within 1e-5 * total of that point (the module sums float32 weights).
- Logprobs: the module reports log-probabilities under the raw logits (before penalties, bias, temperature and
  filters); the reference computes a float64 log-softmax of the raw logits, rounded to float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model.sampling import SamplingParams, SequenceSampler, process_logits, sample_batch

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
TOP_P_SLACK = 1e-5  # |mass before a token - top_p| within which the token may go either way
MIN_P_SLACK = 1e-6  # relative |scaled logit - log(min_p)| within which the token may go either way
DRAW_SLACK = 1e-5  # relative to the total weight: how far from u * total a CDF interval may be
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def f32(x: float) -> float:
    """x rounded to the nearest float32 (past the float32 range: +-inf), as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


@dataclass
class Reference:
    """One row's sampling state, kept apart from the module's: parameters, prompt, output counts, generator."""

    params: SamplingParams
    vocab: int
    prompt: set[int]
    counts: list[int] = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.counts = [0] * self.vocab
        self.generator = torch.Generator().manual_seed(self.params.seed % 2**64)

    def penalised(self, logits: list[float]) -> list[float]:
        """The logits after the repetition, presence and frequency penalties and the bias, clamped to the float32
        range; banned tokens (bias -100) are -inf."""
        p = self.params
        repetition = f32(p.repetition_penalty)
        bias = dict(p.logit_bias)
        out = []
        for token, logit in enumerate(logits):
            if logit == -math.inf or bias.get(token) == -100:  # masked or banned
                out.append(-math.inf)
                continue
            value = logit
            count = self.counts[token]
            if token in self.prompt or count > 0:
                value = f32(value / repetition) if value > 0 else f32(value * repetition)
            if count > 0:
                value = f32(value - f32(p.presence_penalty))
                value = f32(value - f32(f32(p.frequency_penalty) * count))
            if token in bias:
                value = f32(value + f32(bias[token]))
            out.append(min(max(value, -F32_MAX), F32_MAX))
        return out

    def ranked(self, logits: list[float]) -> list[tuple[float, int]]:
        """(penalised logit, token), best first; the lowest token id first among equal logits."""
        return sorted(zip(self.penalised(logits), range(self.vocab), strict=True), key=lambda pair: (-pair[0], pair[1]))

    def keep_top(self) -> int:
        """How many of the best tokens top-k and filter_thres leave (at least one)."""
        p = self.params
        keep = self.vocab
        if p.top_k > 0:
            keep = min(keep, p.top_k)
        if p.filter_thres is not None:
            keep = min(keep, int((1 - p.filter_thres) * self.vocab))
        return max(keep, 1)

    def filtered(self, logits: list[float]) -> list[tuple[int, float, bool | None]]:
        """(token, scaled logit, kept) best first; kept is None where float32 rounding may decide either way.

        The scaled logit is (penalised - best) / temperature; a token whose scaled logit is -inf is not kept."""
        ranked = self.ranked(logits)
        p = self.params
        if p.temperature == 0:  # greedy: only the best
            return [(token, 0.0 if rank == 0 else -math.inf, rank == 0) for rank, (_, token) in enumerate(ranked)]
        temperature = max(f32(p.temperature), F32_TINY)  # 0 or subnormal in float32: the smallest normal
        best = ranked[0][0]
        scaled = [f32(f32(value - best) / temperature) for value, _ in ranked]

        keep_top = self.keep_top()
        top_p = f32(p.top_p)
        weights = [math.exp(s) for s in scaled[:keep_top]]  # top-p sees only what top-k kept
        total = sum(weights)
        min_p = f32(p.min_p)
        log_min_p = math.log(min_p) if min_p > 0 else -math.inf

        rows = []
        mass_before = 0.0
        for rank, ((_, token), s) in enumerate(zip(ranked, scaled, strict=True)):
            votes: list[bool | None] = [rank < keep_top]  # top-k and filter_thres: exact
            if top_p < 1 and rank < keep_top:
                before = mass_before / total
                votes.append(None if abs(before - top_p) <= TOP_P_SLACK else before < top_p)
                mass_before += weights[rank]
            if min_p > 0:
                near = abs(s - log_min_p) <= MIN_P_SLACK * max(abs(s), abs(log_min_p))
                votes.append(None if near else s >= log_min_p)
            kept: bool | None = False if False in votes else (None if None in votes else True)
            if rank == 0:
                kept = True  # the best token always stays
            if s == -math.inf:
                kept = False
            rows.append((token, s, kept))
        return rows

    def draw(self, rows: list[tuple[int, float]]) -> set[int]:
        """The tokens an inverse-CDF draw over rows (token, scaled logit), best first, may give with this row's
        next uniform number u: the one whose CDF interval holds u * total, or a neighbour within DRAW_SLACK."""
        if self.params.temperature == 0:
            return {rows[0][0]}
        u = float(torch.rand(1, generator=self.generator)[0])  # the draw the module makes: one float32 uniform
        weights = [math.exp(s) for _, s in rows]
        total = sum(weights)
        target = u * total
        slack = DRAW_SLACK * total
        possible = set()
        below = 0.0
        for (token, _), weight in zip(rows, weights, strict=True):
            if weight > 0 and below - slack <= target < below + weight + slack:
                possible.add(token)
            below += weight
        return possible

    def logprobs(self, logits: list[float]) -> list[float]:
        """Log-softmax of the raw logits in float64, rounded to float32."""
        best = max(logits)
        log_total = math.log(sum(math.exp(logit - best) for logit in logits))  # relative to the best
        return [f32((logit - best) - log_total) for logit in logits]

    def record(self, token: int) -> None:
        self.counts[token] += 1


def softmax(logits: list[float]) -> list[float]:
    """float64 probabilities of float logits (the best one finite)."""
    best = max(logits)
    weights = [math.exp(logit - best) for logit in logits]
    return [weight / sum(weights) for weight in weights]


def same_float(ours: float, theirs: float, rel: float = 1e-5, abs_: float = 1e-5) -> bool:
    return ours == theirs or math.isclose(ours, theirs, rel_tol=rel, abs_tol=abs_)


# Strategies: mostly values where the filters bite and interact (moderate temperatures, top_p well below 1, a
# few tokens, flat and peaked logits), with the float32 edges mixed in. A strategy listed twice is drawn twice as
# often.
EXTREMES = [F32_MAX, -F32_MAX, 3e38, -3e38, 1e30, -1e30, F32_TINY, -F32_TINY, 1e-45, 0.0, -0.0, 1.0, -1.0]
LOGIT_STYLES = {
    "flat": st.floats(-3, 3, width=32),
    "peaked": st.floats(-10, 10, width=32),
    "ties": st.integers(-6, 6).map(lambda x: x / 2),  # few distinct values: ties everywhere
    "wild": st.floats(-F32_MAX, F32_MAX, width=32) | st.sampled_from([*EXTREMES, -math.inf]),
}
MODERATE_TEMPERATURE = st.floats(0.1, 4)
SOME_TOP_P = st.floats(0.2, 0.99)
SOME_MIN_P = st.floats(0.01, 0.5)
SOME_THRES = st.floats(0, 0.95)
SAMPLING_PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(
        MODERATE_TEMPERATURE,
        MODERATE_TEMPERATURE,
        st.just(1.0),
        st.just(0.0),
        st.sampled_from([1e-50, 1e-40, F32_TINY, 1e-3, F32_MAX]),
    ),
    top_k=st.just(0) | st.integers(1, 8) | st.integers(1, 25),
    top_p=st.one_of(st.just(1.0), SOME_TOP_P, SOME_TOP_P, st.sampled_from([F32_TINY, 1e-6, 0.5, 0.9, 1 - 1e-9])),
    min_p=st.one_of(
        st.just(0.0), st.just(0.0), SOME_MIN_P, st.floats(0, 1), st.sampled_from([1e-50, 1e-45, 1e-6, 1.0])
    ),
    repetition_penalty=st.just(1.0) | st.floats(0.2, 5) | st.sampled_from([F32_TINY, F32_MAX, 1.3]),
    presence_penalty=st.just(0.0) | st.floats(-2, 2),
    frequency_penalty=st.just(0.0) | st.floats(-2, 2),
    filter_thres=st.one_of(st.none(), SOME_THRES, SOME_THRES, st.sampled_from([0.0, 0.5, 0.9, 0.999])),
    seed=st.integers(-(2**63), 2**63 - 1),
    logprobs=st.integers(0, 20),
)
BIAS = st.one_of(st.sampled_from([-100, 100, -100.0, 100.0, 0.0, -99.5]), st.floats(-5, 5), st.floats(-100, 100))


def logit_biases(vocab: int) -> st.SearchStrategy[tuple[tuple[int, float], ...]]:
    """No bias (half the time), or (token id, bias) pairs with distinct ids: bans, +100 and small nudges."""
    pairs = st.lists(st.tuples(st.integers(0, vocab - 1), BIAS), max_size=vocab, unique_by=lambda pair: pair[0])
    return st.just(()) | pairs.map(tuple)


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[list[float]], list[SamplingParams], list[list[int]]]:
    """(logits rows, parameters, prompts) for a batch of 1 to 6 rows over a vocabulary of 1 to 24 tokens."""
    vocab = draw(st.integers(1, 24))
    rows, params, prompts = [], [], []
    for _ in range(draw(st.integers(1, 6))):
        style = LOGIT_STYLES[draw(st.sampled_from(sorted(LOGIT_STYLES)))]
        logits = draw(st.lists(style, min_size=vocab, max_size=vocab))
        bias = draw(logit_biases(vocab))
        banned = {token for token, value in bias if value == -100}
        if len(banned) == vocab:  # the sampler refuses a bias that bans every token
            bias = tuple(pair for pair in bias if pair[0] != 0)
            banned.discard(0)
        left = [token for token in range(vocab) if token not in banned]
        if all(logits[token] == -math.inf for token in left):
            logits[left[0]] = 0.0  # a row with nothing left fails by design; test_sampling covers that
        rows.append(logits)
        params.append(replace(draw(SAMPLING_PARAMS), logit_bias=bias))
        prompts.append(draw(st.lists(st.integers(0, vocab - 1), max_size=vocab)))
    return rows, params, prompts


@given(batches())
def test_sampling_matches_the_reference(case: tuple[list[list[float]], list[SamplingParams], list[list[int]]]) -> None:
    """Over three steps (the penalties see the tokens drawn before; the logits are halved at each step, so the
    filters meet flatter distributions), each row's kept tokens, its sampling distribution, its drawn token (same
    uniform number), its logprob and top logprobs, and its output counts agree with the reference, beside other
    rows whose filters differ.

    Catches: top-p on the untempered logits; top-p over all tokens instead of those top-k kept; min-p against
    the untempered best, or against the total instead of the best token's tempered probability; top-k keeping
    one token too many; filter_thres rounding (1 - thres) * V up; the repetition penalty over output tokens only
    (forgetting the prompt); the presence penalty over prompt tokens too; a draw that does not scale the uniform
    number by the total weight; logprobs from the penalised or biased logits instead of the raw ones; the bias
    added after temperature, or before the penalties; a banned token drawn, or filters measured from a banned
    best token."""
    rows, params, prompts = case
    vocab = len(rows[0])
    first = torch.tensor(rows, dtype=torch.float32)  # (B, V)
    samplers = [SequenceSampler(p, vocab) for p in params]
    references = [Reference(p, vocab, set(prompt)) for p, prompt in zip(params, prompts, strict=True)]
    for s, prompt in zip(samplers, prompts, strict=True):
        s.observe_prompt(prompt)

    for step in range(STEPS):
        logits = first * 0.5**step  # (B, V) flatter at each step, as a model's logits change
        raw = [[float(x) for x in row] for row in logits]  # the float32 values the module sees
        distribution = process_logits(logits, samplers)  # (B, V); draws nothing
        result = sample_batch(logits, samplers)
        assert result.errors == [None] * len(rows)
        for row, (reference, row_logits) in enumerate(zip(references, raw, strict=True)):
            where = f"step {step}, row {row}"
            filtered = reference.filtered(row_logits)
            ours = distribution[row].tolist()

            kept = [token for token, _, _ in filtered if ours[token] != -math.inf]  # best first
            for token, scaled, expected in filtered:
                if expected is not None:
                    assert (token in kept) == expected, (where, token, scaled, kept)
            scaled_of = {token: scaled for token, scaled, _ in filtered}
            for token in kept:
                assert same_float(ours[token], scaled_of[token], 1e-6, 1e-30), (where, token)
            for mine, theirs in zip(
                softmax([ours[t] for t in kept]), softmax([scaled_of[t] for t in kept]), strict=True
            ):
                assert math.isclose(mine, theirs, rel_tol=1e-5, abs_tol=1e-6), (where, kept)

            token = int(result.tokens[row])
            possible = reference.draw([(t, scaled_of[t]) for t in kept])
            assert token in possible, (where, token, possible)

            logprobs = reference.logprobs(row_logits)
            assert same_float(float(result.logprobs[row]), logprobs[token]), (where, token)
            wanted = min(reference.params.logprobs, vocab)
            best = sorted(logprobs, reverse=True)[:wanted]
            best = [value for value in best if value != -math.inf]
            top = result.top_logprobs[row]
            assert len(top) == len(best), where
            assert len({t for t, _ in top}) == len(top), where
            for (t, value), expected_value in zip(top, best, strict=True):
                assert same_float(value, expected_value), (where, t)
                assert same_float(value, logprobs[t]), (where, t)

            reference.record(token)
            if reference.params.penalised:
                assert samplers[row].output_counts.tolist() == reference.counts, where
