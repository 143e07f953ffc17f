"""From a validated completion request to engine requests: prompts as token ids, sampling parameters, and every
limit of the model and the server, checked before anything is queued."""

from __future__ import annotations

import asyncio

from model.sampling import SamplingError, SamplingParams
from model.tokenizer import ByteTokenizer
from server.config import Settings
from server.engine import Engine
from server.engine_request import EngineRequest
from server.errors import InvalidRequest
from server.protocol import DEFAULT_MAX_TOKENS, CompletionRequest, check_prompt_tokens
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


def sampling_params(body: CompletionRequest, choice: int) -> SamplingParams:
    """Sampling parameters of one choice: SamplingParams' defaults for what the request leaves out (or sends as
    null); with a seed, choice i uses seed + i so that choices differ."""
    given = {name: value for name in SAMPLING_FIELDS if (value := getattr(body, name)) is not None}
    if body.top_k is not None:
        given["top_k"] = max(0, body.top_k)  # -1 also turns it off
    if body.logprobs is not None:
        given["logprobs"] = body.logprobs
    if body.seed is not None:
        given["seed"] = (body.seed + choice) % 2**64
    params = SamplingParams(**given)
    try:
        params.validate()
    except SamplingError as error:
        raise InvalidRequest(str(error), param=error.param) from error
    return params


def generation_length(body: CompletionRequest, settings: Settings) -> int:
    """max_tokens, within the server's limit (over it: 400, or the limit when the server clamps)."""
    wanted = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if wanted <= settings.max_tokens_limit:
        return wanted
    if settings.clamp_max_tokens:
        return settings.max_tokens_limit
    raise InvalidRequest(f"max_tokens must be at most {settings.max_tokens_limit}", param="max_tokens")


def check_context(prompts: list[list[int]], context_limit: int | None) -> None:
    """Each prompt must leave room in the model's context for at least one generated token."""
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
    body: CompletionRequest, engine: Engine, settings: Settings, loop: asyncio.AbstractEventLoop
) -> tuple[list[list[int]], list[EngineRequest]]:
    """Validate the request against the model and the server's limits -> its prompts as token ids, and one
    engine request per choice (prompt i, sample j has tag i * n + j), all sharing one event queue."""
    if body.n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}", param="n")
    max_tokens = generation_length(body, settings)
    prompts = prompt_token_lists(body.prompt, settings)
    check_context(prompts, engine.context_limit)
    check_sequences(len(prompts), body.n, engine, settings)
    events: asyncio.Queue = asyncio.Queue()
    requests = []
    for prompt_index, ids in enumerate(prompts):
        for sample in range(body.n):
            index = prompt_index * body.n + sample
            requests.append(EngineRequest(ids, sampling_params(body, index), max_tokens, loop, events, tag=index))
    return prompts, requests
