"""Per-sequence sampling: each row of a batch has its own parameters, token counts and seeded generator.

One step turns a batch of logits (B, V) into one token per row:

    raw logits (float32)
    -> repetition penalty (tokens seen in prompt or output), presence/frequency penalties (output only)
    -> logit_bias added (token id -> bias in [-100, 100]); a bias of exactly -100 bans the token (-inf)
    -> clamp to the float32 range, so nothing can overflow (masked -inf and banned tokens stay -inf)
    -> greedy rows (temperature 0): argmax
    -> temperature, top-k and filter_thres, top-p, min-p, measured from the best token left; it always stays
    -> inverse CDF with one uniform number drawn from the row's own generator

Every step is a row-wise tensor operation over the whole batch, and each row's randomness comes only from
its own generator, so a seeded sequence gets the same tokens alone or in any batch. Parameters are checked
against what float32 can hold, so a valid value means the same as a tensor: a positive temperature below the
smallest normal float32 divides by that smallest normal, which is greedy-like (a token more than 1.3e-36
below the best gets weight 0). Reported logprobs are those of the raw logits (no penalty, bias or filter).
A row whose raw logits are NaN or +inf (or all -inf), or whose every token is -inf or banned, fails alone:
its token is -1 and its error says why; valid parameters cannot fail a row with finite logits.

A batch may be constrained (model/grammar.py): each row then has a mask of the tokens it may pick, plus one
more column, the end of its text. Every logit above is widened to V + 1 columns after the bias: forbidden tokens
-inf, and the end's logit the log of the forbidden tokens' total probability where the grammar may end, else -inf.
Filters and the draw treat the end as one more token; a row that picks it gets ENDED_TOKEN. Reported logprobs are
then those of the widened raw logits: the constrained distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.sampling_params import BAN, FLOAT32_MAX, FLOAT32_TINY, SamplingError, SamplingParams
from model.sampling_params import MAX_LOGPROBS as MAX_LOGPROBS  # re-exported: importable from here as before

FAILED_TOKEN = -1
ENDED_TOKEN = -2  # a constrained row whose text ends here
_FAILURES = {
    1: "logits contain NaN",
    2: "logits contain +inf",
    3: "all logits are -inf",
    4: "every token is -inf in the logits or banned by logit_bias",
    5: "the constraint allows no token that the logits and logit_bias leave",
}
NOTHING_ALLOWED = _FAILURES[5]  # a constrained row's failure that the request caused


class SequenceSampler:
    """The sampling state of one sequence: its parameters, seeded generator and token counts."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu") -> None:
        params.validate()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is None:
            self.seed: int = self.generator.seed()
        else:
            self.seed = params.seed % 2**64  # negative seeds are valid in the API; torch wants unsigned
            self.generator.manual_seed(self.seed)
        self.prompt_seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)  # (V,)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=self.device)  # (V,)
        top_k = min(params.top_k or vocab_size, vocab_size)
        filter_k = vocab_size if params.filter_thres is None else int((1 - params.filter_thres) * vocab_size)
        # How many of the best tokens stay candidates: top_k and filter_thres together, at least one.
        self.keep_top = 1 if params.greedy else max(1, min(top_k, filter_k))
        # The dense logit_bias, -inf for banned tokens; None without one, so unbiased rows skip the addition.
        self.bias = _bias_vector(params.logit_bias, vocab_size, self.device) if params.logit_bias else None  # (V,)

    def observe_prompt(self, ids: Sequence[int] | Tensor) -> None:
        """Mark prompt tokens as seen, for the repetition penalty. A list of byte ids goes through `bytes`, which
        checks their range in C: 8 million of them take 0.1 s, where a tensor of Python ints takes 1.2 s."""
        if isinstance(ids, list) and self.vocab_size <= 256:
            try:
                packed = bytes(ids)
            except (ValueError, TypeError):
                raise ValueError(f"prompt token ids must be in 0..{self.vocab_size - 1}") from None
            ids = torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.empty(0)  # (T,)
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).flatten()  # (T,)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        self.prompt_seen[ids] = True

    def record(self, token_id: int) -> None:
        """Count a generated token (sample_batch does this itself for the tokens it picks)."""
        self.output_counts[token_id] += 1


def _bias_vector(pairs: Sequence[tuple[int, float]], vocab_size: int, device: torch.device) -> Tensor:  # (V,)
    """The (V,) float32 bias of validated (token id, bias) pairs: -inf where banned, -0.0 (x + -0.0 == x) elsewhere."""
    for token, _ in pairs:
        if token >= vocab_size:
            raise SamplingError(
                "logit_bias", f"token {token} is not in the vocabulary of {vocab_size} (ids 0..{vocab_size - 1})"
            )
    if sum(bias == BAN for _, bias in pairs) == vocab_size:
        raise SamplingError("logit_bias", f"bans all {vocab_size} tokens of the vocabulary: nothing is left to sample")
    ids = torch.tensor([token for token, _ in pairs], dtype=torch.long, device=device)  # (N,)
    values = [-math.inf if bias == BAN else float(bias) for _, bias in pairs]
    bias = torch.full((vocab_size,), -0.0, dtype=torch.float32, device=device)  # (V,)
    return bias.index_put_((ids,), torch.tensor(values, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class BatchParams:
    """The per-row parameters of a batch as tensors on the logits' device."""

    temperature: Tensor  # (B,)
    top_p: Tensor  # (B,)
    min_p: Tensor  # (B,)
    repetition_penalty: Tensor  # (B,)
    presence_penalty: Tensor  # (B,)
    frequency_penalty: Tensor  # (B,)
    keep_top: Tensor  # (B,) long
    greedy: Tensor  # (B,) bool, temperature == 0 as given (not as float32, where 1e-50 is 0 too)

    @classmethod
    def from_samplers(cls, samplers: Sequence[SequenceSampler], device: torch.device) -> BatchParams:
        rows = [
            (
                p.temperature,
                p.top_p,
                p.min_p,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
                float(p.greedy),
            )
            for p in (s.params for s in samplers)
        ]
        values = torch.tensor(rows, dtype=torch.float32, device=device)  # (B, 7)
        keep_top = torch.tensor([s.keep_top for s in samplers], dtype=torch.long, device=device)  # (B,)
        return cls(*values[:, :6].unbind(1), keep_top=keep_top, greedy=values[:, 6] > 0)


@dataclass
class SampleResult:
    """One step's picks. Failed rows have token -1, logprob 0.0, no alternatives and an error message."""

    tokens: Tensor  # (B,) long
    logprobs: Tensor  # (B,) float32, log-probability of each token under the raw logits
    top_logprobs: list[list[tuple[int, float]]]
    errors: list[str | None]


def apply_penalties(logits: Tensor, seen: Tensor, counts: Tensor, params: BatchParams) -> Tensor:  # (B, V)
    """Repetition penalty on seen tokens (prompt or output), then presence/frequency on output counts.

    logits (B, V) float32; seen (B, V) bool; counts (B, V) of generated-token counts. The result is clamped to
    the float32 range, so a penalty cannot overflow a finite logit to +-inf; -inf logits (masked) stay -inf.
    """
    counts = counts.to(logits.dtype)  # (B, V)
    seen = seen | (counts > 0)  # (B, V)
    rep = params.repetition_penalty[:, None]  # (B, 1)
    repeated = torch.where(logits > 0, logits / rep, logits * rep)  # (B, V)
    presence = params.presence_penalty[:, None] * (counts > 0)  # (B, V)
    penalised = torch.where(seen, repeated, logits) - presence - params.frequency_penalty[:, None] * counts
    return penalised.clamp(-FLOAT32_MAX, FLOAT32_MAX).masked_fill(logits.isneginf(), -math.inf)  # (B, V)


def _failure_codes(logits: Tensor) -> Tensor:  # (B,) long, 0 = fine, else a key of _FAILURES
    if bool(logits.isfinite().all()):  # the usual case, in one pass
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    nan = logits.isnan().any(-1)  # (B,)
    pos_inf = logits.isposinf().any(-1)  # (B,)
    all_neg_inf = logits.isneginf().all(-1)  # (B,)
    code = torch.where(all_neg_inf, 3, 0)
    code = torch.where(pos_inf, 2, code)
    return torch.where(nan, 1, code)


def apply_bias(logits: Tensor, samplers: Sequence[SequenceSampler], code: Tensor) -> tuple[Tensor, Tensor]:
    """Add each row's logit_bias to logits (B, V) within the float32 range: -inf where masked or banned.

    The sum needs no clamp, and the penalties' clamp before it is the clamp after it: a finite bias is at most
    100, far below half the float32 spacing at +-FLOAT32_MAX (2**103), so it cannot move a value past them. Rows
    without a bias add -0.0, which leaves every value as it was, bit for bit. A row with nothing left (every
    token -inf or banned) fails with code 4 and is zeroed. Returns (biased logits, failure codes)."""
    unbiased = torch.full_like(logits[0], -0.0)  # (V,)
    bias = torch.stack([unbiased if s.bias is None else s.bias for s in samplers])  # (B, V)
    removed = logits.isneginf() | bias.isneginf()  # (B, V)
    biased = (logits + bias).masked_fill(removed, -math.inf)  # (B, V)
    code = torch.where((code == 0) & removed.all(-1), 4, code)  # (B,)
    return biased.masked_fill(code[:, None] > 0, 0.0), code


def _widened(logits: Tensor, allowed: Tensor) -> Tensor:  # (B, V + 1)
    """Logits (B, V) under a constraint `allowed` (B, V + 1): forbidden tokens -inf, then the end's column, the
    logsumexp of the forbidden tokens' logits where the end is allowed (-inf where it is not, or none is)."""
    tokens_allowed, may_end = allowed[:, :-1], allowed[:, -1:]  # (B, V), (B, 1)
    forbidden_mass = torch.logsumexp(logits.masked_fill(tokens_allowed, -math.inf), -1, keepdim=True)  # (B, 1)
    end = forbidden_mass.masked_fill(~may_end, -math.inf)  # (B, 1)
    return torch.cat([logits.masked_fill(~tokens_allowed, -math.inf), end], dim=-1)


def _adjusted(
    logits: Tensor, samplers: Sequence[SequenceSampler], params: BatchParams | None, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(raw float32 logits, penalised and biased logits, failure codes); failed rows are zeroed, so that each row
    of both has a finite best token. Under a constraint `allowed` (B, V + 1) both are widened to V + 1 columns.

    `params` may be None when no sampler has a penalty."""
    raw = logits.float()  # (B, V)
    code = _failure_codes(raw)  # (B,)
    raw = adjusted = raw.masked_fill(code[:, None] > 0, 0.0)  # (B, V)
    if any(s.params.penalised for s in samplers):
        seen = torch.stack([s.prompt_seen for s in samplers])  # (B, V)
        counts = torch.stack([s.output_counts for s in samplers])  # (B, V)
        adjusted = apply_penalties(raw, seen, counts, params)  # (B, V)
    if any(s.bias is not None for s in samplers):
        adjusted, code = apply_bias(adjusted, samplers, code)  # (B, V), (B,)
    if allowed is not None:  # widened once where no penalty or bias made the adjusted logits a tensor of their own
        unadjusted = adjusted is raw
        raw = _widened(raw, allowed)  # (B, V + 1)
        adjusted = raw if unadjusted else _widened(adjusted, allowed)  # (B, V + 1)
        code = torch.where((code == 0) & adjusted.isneginf().all(-1), 5, code)  # (B,)
        raw = raw.masked_fill(code[:, None] > 0, 0.0)
        adjusted = raw if unadjusted else adjusted.masked_fill(code[:, None] > 0, 0.0)
    return raw, adjusted, code


def _filter_sorted(adjusted: Tensor, params: BatchParams, samplers: Sequence[SequenceSampler]) -> tuple[Tensor, Tensor]:
    """Temperature and the candidate filters, on each row sorted best first.

    Returns (scaled logits, token ids), both (B, V) in descending order; the best is 0, removed are -inf.
    A stable sort puts the lowest id first among ties, so rank 0 is the argmax; no filter removes it. A filter
    no row of the batch uses is skipped (it would keep every token).
    """
    vocab_size = adjusted.shape[-1]
    ordered, ids = adjusted.sort(dim=-1, descending=True, stable=True)  # (B, V)
    # A positive temperature that is 0 or subnormal in float32 divides by the smallest normal: greedy-like.
    temperature = torch.where(params.greedy, 1.0, params.temperature.clamp(min=FLOAT32_TINY))  # (B,)
    scaled = (ordered - ordered[:, :1]) / temperature[:, None]  # (B, V)
    keep = torch.ones_like(scaled, dtype=torch.bool)  # (B, V)
    if any(s.keep_top < vocab_size for s in samplers):
        keep &= torch.arange(vocab_size, device=ordered.device)[None, :] < params.keep_top[:, None]
    if any(s.params.top_p < 1 for s in samplers):
        probs = torch.softmax(scaled.masked_fill(~keep, -math.inf), dim=-1)  # (B, V)
        mass_before = probs.cumsum(-1) - probs  # (B, V) probability ranked above each token
        top_p = params.top_p[:, None]  # (B, 1)
        keep &= (mass_before < top_p) | (top_p >= 1)
    if any(s.params.min_p > 0 for s in samplers):
        keep &= scaled >= params.min_p.log()[:, None]  # p / p_max >= min_p, in log space
    keep[:, 0] = True  # the best token, whatever the filters' float32 rounding did
    return scaled.masked_fill(~keep, -math.inf), ids


def process_logits(logits: Tensor, samplers: Sequence[SequenceSampler]) -> Tensor:  # (B, V)
    """The distribution each row samples from, as float32 logits in vocabulary order.

    Each row is shifted so its best token is 0; removed tokens (and every token of a failed row) are -inf.
    """
    params = BatchParams.from_samplers(samplers, logits.device)
    _, adjusted, code = _adjusted(logits, samplers, params)
    scaled, ids = _filter_sorted(adjusted, params, samplers)  # (B, V)
    out = torch.full_like(scaled, -math.inf).scatter_(1, ids, scaled)  # (B, V)
    return out.masked_fill(code[:, None] > 0, -math.inf)


def _uniforms(samplers: Sequence[SequenceSampler], device: torch.device) -> Tensor:  # (B,)
    """One uniform number in [0, 1) per row from that row's generator; greedy rows draw nothing."""
    draws = [
        torch.zeros(1, device=device) if s.params.greedy else torch.rand(1, generator=s.generator, device=device)
        for s in samplers
    ]
    return torch.cat(draws)


def _draw(scaled: Tensor, ids: Tensor, uniforms: Tensor) -> Tensor:  # (B,) long
    """Inverse CDF: the first sorted token whose cumulative weight exceeds u * total, always one of 0..V-1."""
    weights = scaled.exp()  # (B, V), the best token has weight 1
    cdf = weights.cumsum(-1)  # (B, V)
    target = uniforms[:, None] * cdf[:, -1:]  # (B, 1)
    rank = torch.searchsorted(cdf, target, right=True)  # (B, 1) in 0..V
    last = (weights > 0).sum(-1, keepdim=True).clamp(min=1) - 1  # (B, 1) rounding can put target at the total
    return ids.gather(1, torch.minimum(rank, last)).squeeze(1)


def _top_logprobs(
    logprobs: Tensor, samplers: Sequence[SequenceSampler], failed: list[bool]
) -> list[list[tuple[int, float]]]:
    wanted = [0 if bad else s.params.logprobs for s, bad in zip(samplers, failed, strict=True)]
    most = min(max(wanted, default=0), logprobs.shape[-1])
    if most == 0:
        return [[] for _ in samplers]
    values, ids = logprobs.topk(most, dim=-1)  # (B, most)
    rows = zip(ids.tolist(), values.tolist(), wanted, strict=True)
    return [
        [(i, v) for i, v in zip(row_ids[:n], row_values[:n], strict=True) if v != -math.inf]
        for row_ids, row_values, n in rows
    ]


def sample_batch(logits: Tensor, samplers: Sequence[SequenceSampler], allowed: Tensor | None = None) -> SampleResult:
    """Pick one token per row of logits (B, V) with that row's sampler, and count it there; under a constraint
    `allowed` (B, V + 1) bool (the tokens, then the end), a row may pick the end instead (ENDED_TOKEN)."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"expected logits (B, V) with B = {len(samplers)} samplers, got {tuple(logits.shape)}")
    if len({id(s) for s in samplers}) != len(samplers):
        raise ValueError("each row needs its own sampler; one sampler appears twice")
    for s in samplers:
        if s.vocab_size != logits.shape[-1] or s.device.type != logits.device.type:
            raise ValueError(
                f"sampler for vocab {s.vocab_size} on {s.device} does not fit logits "
                f"{tuple(logits.shape)} on {logits.device}"
            )
    device = logits.device
    greedy = all(s.params.greedy for s in samplers)
    needs_params = not greedy or any(s.params.penalised for s in samplers)
    params = BatchParams.from_samplers(samplers, device) if needs_params else None
    if allowed is not None and allowed.shape != (logits.shape[0], logits.shape[1] + 1):
        raise ValueError(f"a constraint (B, V + 1) for logits {tuple(logits.shape)}, got {tuple(allowed.shape)}")
    vocab_size = logits.shape[-1]
    raw, adjusted, code = _adjusted(logits, samplers, params, allowed)
    failed = code > 0  # (B,)
    if greedy:
        tokens = adjusted.argmax(dim=-1)  # (B,) the lowest id among ties, as the sorted path picks
    else:
        scaled, ids = _filter_sorted(adjusted, params, samplers)  # (B, V)
        tokens = _draw(scaled, ids, _uniforms(samplers, device))  # (B,)
    raw_logprobs = torch.log_softmax(raw, dim=-1)  # (B, V), or (B, V + 1) under a constraint
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).masked_fill(failed, 0.0)  # (B,)
    ended = tokens == vocab_size  # (B,) only a constraint's end column has this index
    tokens = tokens.masked_fill(ended, ENDED_TOKEN).masked_fill(failed, FAILED_TOKEN)
    counted = ~failed & ~ended  # (B,)
    safe = tokens.clamp(min=0)  # (B,)

    counting = [row for row, s in enumerate(samplers) if s.params.penalised]  # only penalties read the counts
    if counting:
        index = torch.tensor(counting, device=device)  # (P,)
        counts = torch.stack([samplers[row].output_counts for row in counting])  # (P, V)
        counts.scatter_add_(1, safe[index, None], counted[index, None].to(counts.dtype))
        for row, counted in zip(counting, counts.unbind(0), strict=True):
            samplers[row].output_counts = counted

    codes = code.tolist()
    failed_rows = [c > 0 for c in codes]
    errors = [_FAILURES[c] if c else None for c in codes]
    return SampleResult(tokens, chosen, _top_logprobs(raw_logprobs[:, :vocab_size], samplers, failed_rows), errors)
