"""From a validated request to engine requests: prompts as token ids, a `GenerationSpec` that says the same for
completions and chat, sampling parameters, and every limit of the model and the server, checked before anything
is queued."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.grammar import Grammar
from model.sampling import SamplingError, SamplingParams
from model.tokenizer import VOCAB_SIZE, ByteTokenizer
from server.config import Settings
from server.engine import Engine
from server.engine_request import EngineRequest
from server.errors import InvalidRequest
from server.protocol import DEFAULT_MAX_TOKENS, GenerationRequest, check_prompt_tokens
from server.scheduler import tokens_that_fit

tokenizer = ByteTokenizer()
SAMPLING_FIELDS = (  # request fields that are SamplingParams fields of the same name and meaning
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def prompt_token_lists(prompt: str | list, settings: Settings) -> list[list[int]]:
    """The request's validated prompt as one or more lists of token ids, within the server's length limit."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = [tokenizer.encode(item) if isinstance(item, str) else item for item in prompt]
    check_prompt_tokens(sum(len(ids) for ids in prompts), settings, "prompt")
    return prompts


@dataclass(frozen=True)
class GenerationSpec:
    """What one API request asks the engine for, whichever endpoint it came through."""

    prompts: list[list[int]]
    n: int  # choices returned per prompt
    candidates: int  # sequences generated per prompt: best_of, at least n
    max_tokens: int
    min_tokens: int
    stop: list[str]
    logprobs: int | None  # alternatives reported per token; None: no logprobs
    echo: bool
    sampling: dict[str, Any]  # SamplingParams fields, the seed aside
    seed: int | None
    grammar: Grammar | None = None  # the constraint every candidate's text follows

    @property
    def prompt_logprobs(self) -> int | None:
        """Scoring: with echo and logprobs, the prompt's own tokens carry logprobs too."""
        return self.logprobs if self.echo else None


def generation_spec(
    body: GenerationRequest,
    prompts: list[list[int]],
    settings: Settings,
    *,
    max_tokens: int | None,
    logprobs: int | None = None,
    echo: bool = False,
    best_of: int | None = None,
    extra_stop: Sequence[str] = (),
    length_param: str = "max_tokens",
) -> GenerationSpec:
    """Check a request's generation fields against each other and the server's limits -> its spec."""
    n = 1 if body.n is None else body.n
    if n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}", param="n")
    candidates = n if best_of is None else best_of
    if candidates < n:
        raise InvalidRequest(f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if candidates > settings.max_n:
        raise InvalidRequest(f"best_of must be at most {settings.max_n}", param="best_of")
    length = generation_length(max_tokens, settings, length_param)
    min_tokens = body.min_tokens or 0
    if min_tokens > length:
        raise InvalidRequest(f"min_tokens ({min_tokens}) must not exceed max_tokens ({length})", param="min_tokens")
    sampling = {name: value for name in SAMPLING_FIELDS if (value := getattr(body, name)) is not None}
    if body.top_k is not None:
        sampling["top_k"] = max(0, body.top_k)  # -1 also turns it off
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    if body.logit_bias:
        if sum(bias == -100 for bias in body.logit_bias.values()) == VOCAB_SIZE:
            raise InvalidRequest("logit_bias bans every token: nothing is left to sample", param="logit_bias")
        sampling["logit_bias"] = tuple((int(token), bias) for token, bias in body.logit_bias.items())
    spec = GenerationSpec(
        prompts, n, candidates, length, min_tokens, [*body.stop, *extra_stop], logprobs, echo, sampling, body.seed
    )
    check_prompt_scores(spec, settings)
    sampling_params(spec, 0)  # a parameter out of range is refused before anything is queued
    return spec


def check_prompt_scores(spec: GenerationSpec, settings: Settings) -> None:
    """Scoring a prompt is cheap for the model but not for the response: each of its tokens, in every choice,
    carries logprobs + 1 values, all turned into JSON on the event loop."""
    if spec.prompt_logprobs is None:
        return
    values = sum(len(ids) for ids in spec.prompts) * spec.candidates * (spec.prompt_logprobs + 1)
    if values > settings.max_prompt_logprobs:
        raise InvalidRequest(
            f"echo with logprobs={spec.prompt_logprobs} asks for {values} logprob values over the prompt's tokens "
            f"and choices; this server gives at most {settings.max_prompt_logprobs} (fewer logprobs, choices or "
            "prompt tokens)",
            param="logprobs",
        )


def sampling_params(spec: GenerationSpec, candidate: int) -> SamplingParams:
    """Sampling parameters of one candidate: SamplingParams' defaults for what the request leaves out (or sends
    as null); with a seed, candidate i uses seed + i (wrapped into the signed 64-bit range) so that they differ."""
    given = dict(spec.sampling)
    if spec.seed is not None:
        given["seed"] = (spec.seed + candidate + 2**63) % 2**64 - 2**63
    params = SamplingParams(**given)
    try:
        params.validate()
    except SamplingError as error:
        raise InvalidRequest(str(error), param=error.param) from error
    return params


def generation_length(max_tokens: int | None, settings: Settings, param: str = "max_tokens") -> int:
    """max_tokens, within the server's limit (over it: 400, or the limit when the server clamps)."""
    wanted = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if wanted <= settings.max_tokens_limit:
        return wanted
    if settings.clamp_max_tokens:
        return settings.max_tokens_limit
    raise InvalidRequest(f"{param} must be at most {settings.max_tokens_limit}", param=param)


def check_context(prompts: list[list[int]], context_limit: int | None) -> None:
    """Each prompt must fit the model's context (the last token generated is never fed back, so a prompt that
    fills the context still gets one token, and with max_tokens 0 none is wanted)."""
    for ids in prompts:
        fit = tokens_that_fit(len(ids), context_limit)
        if fit is not None and fit < 1:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this model's context is {context_limit} tokens", param="prompt"
            )


def check_sequences(prompts: int, n: int, engine: Engine, settings: Settings) -> None:
    """prompts x n sequences within the server's limit, and able to fit its slots and queue at all."""
    sequences = prompts * n
    if sequences > settings.max_sequences:
        raise InvalidRequest(
            f"{prompts} prompts x n={n} is {sequences} sequences; at most {settings.max_sequences}", param="n"
        )
    if sequences > engine.max_batch_size + engine.max_queue:
        raise InvalidRequest(
            f"{prompts} prompts x n={n} sequences can never fit this server's "
            f"{engine.max_batch_size} slots and {engine.max_queue} queue places",
            param="n",
        )


def engine_requests(
    spec: GenerationSpec, engine: Engine, settings: Settings, loop: asyncio.AbstractEventLoop
) -> list[EngineRequest]:
    """Check the spec against the model and the server's limits -> one engine request per candidate (prompt i,
    candidate j has tag i * candidates + j), all sharing one event queue."""
    check_context(spec.prompts, engine.context_limit)
    check_sequences(len(spec.prompts), spec.candidates, engine, settings)
    events: asyncio.Queue = asyncio.Queue()
    requests = []
    for prompt_index, ids in enumerate(spec.prompts):
        for candidate in range(spec.candidates):
            tag = prompt_index * spec.candidates + candidate
            params = sampling_params(spec, candidate)
            requests.append(
                EngineRequest(
                    ids,
                    params,
                    spec.max_tokens,
                    loop,
                    events,
                    tag=tag,
                    prompt_logprobs=spec.prompt_logprobs,
                    grammar=spec.grammar,
                )
            )
    return requests
