"""What one sequence may ask of the sampler (SamplingParams), and the checks that make a valid value mean the same
as a float32 tensor. model.sampling applies the parameters and re-exports everything public here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20
BAN = -100  # the logit_bias that bans a token (OpenAI: -100 "should result in a ban")
_FLOAT32 = torch.finfo(torch.float32)
FLOAT32_TINY = _FLOAT32.tiny  # the smallest normal float32, about 1.2e-38
FLOAT32_MAX = _FLOAT32.max  # the largest float32, about 3.4e38


class SamplingError(ValueError):
    """A sampling parameter is out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_logit_bias(pairs: object) -> None:
    """(token id, bias) pairs: each id an integer >= 0 given once, each bias a number in [-100, 100]."""
    if not isinstance(pairs, (tuple, list)):
        raise SamplingError("logit_bias", f"must be a tuple of (token id, bias) pairs, got {pairs!r}")
    ids: set[int] = set()
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SamplingError("logit_bias", f"must be (token id, bias) pairs, got {pair!r}")
        token, bias = pair
        if not _is_int(token) or token < 0:
            raise SamplingError("logit_bias", f"token ids must be integers >= 0, got {token!r}")
        if not _is_number(bias) or not BAN <= bias <= -BAN:  # NaN fails every comparison
            raise SamplingError("logit_bias", f"the bias of token {token} must be in [-100, 100], got {bias!r}")
        if token in ids:
            raise SamplingError("logit_bias", f"token {token} is given twice")
        ids.add(token)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. Defaults sample from the model's distribution unchanged."""

    temperature: float = 1.0  # 0 means greedy argmax; 0 < t < float32 tiny is greedy-like
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # CTRL rule over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI rule over output tokens
    frequency_penalty: float = 0.0
    filter_thres: float | None = None  # local-attention's top_k(logits, thres): keep int((1 - thres) * V)
    seed: int | None = None
    logprobs: int = 0  # how many top alternatives to report
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); -100 bans the token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits (and so token counts must be kept)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> None:
        """Raise SamplingError naming the first field that is out of range."""
        t = self.temperature
        if not _is_number(t) or not 0 <= t <= FLOAT32_MAX:  # NaN fails every comparison
            raise SamplingError(
                "temperature", f"must be a number >= 0 and at most {FLOAT32_MAX:.1e} (the largest float32), got {t!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError("top_k", f"must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not FLOAT32_TINY <= self.top_p <= 1:  # smaller is 0 or subnormal
            raise SamplingError(
                "top_p",
                f"must be at most 1 and at least {FLOAT32_TINY:.1e} (the smallest normal float32), got {self.top_p!r}",
            )
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise SamplingError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not FLOAT32_TINY <= r <= FLOAT32_MAX:
            raise SamplingError(
                "repetition_penalty",
                f"must be a normal float32 > 0: from {FLOAT32_TINY:.1e} (the smallest normal float32) to "
                f"{FLOAT32_MAX:.1e} (the largest), got {r!r}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise SamplingError(name, f"must be in [-2, 2], got {value!r}")
        f = self.filter_thres
        if f is not None and (not _is_number(f) or not 0 <= f < 1):
            raise SamplingError("filter_thres", f"must be in [0, 1) or None, got {f!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise SamplingError("seed", f"must be a signed 64-bit integer (or None), got {self.seed!r}")
        if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingError("logprobs", f"must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        _check_logit_bias(self.logit_bias)
