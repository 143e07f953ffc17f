"""Request and response bodies of the OpenAI-compatible API.

Requests are validated strictly (server/body.py): a string or boolean is never taken for a number, nor a number
for a boolean; text must be valid Unicode without NUL characters. Every field of OpenAI's request schemas is
accepted, and `null` means the default for every optional one; what the server cannot honour is refused with a
400 naming the field. Fields nobody declared are ignored (named in the `x-windowlm-ignored-fields` header and
counted), or refused when the server runs with `--reject-unknown-fields`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from model.sampling import FLOAT32_MAX, FLOAT32_TINY, SamplingParams
from model.tokenizer import VOCAB_SIZE
from server.config import Settings
from server.constraint_protocol import ConstraintFields
from server.errors import InvalidRequest
from server.fields import STRICT, Text, integer

TokenId = Annotated[int, Field(ge=0, lt=VOCAB_SIZE)]  # strict: a long list is validated without Python calls
TokenIds = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]
Texts = Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, fail_fast=True)]
TokenIdLists = Annotated[list[TokenIds], Field(min_length=1, fail_fast=True)]
Prompt = Annotated[Text, Field(min_length=1)] | Texts | TokenIds | TokenIdLists
StopText = Annotated[Text, Field(min_length=1)]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
SAMPLING = SamplingParams()  # the defaults of every sampling field, declared once, in model.sampling


def check_prompt_tokens(count: int, settings: Settings, param: str) -> None:
    """The one rule on prompt length: all the prompts of a request hold at most `max_prompt_tokens` tokens. A
    string's length in characters is a lower bound of its tokens (bytes), so it may be checked before encoding."""
    if count > settings.max_prompt_tokens:
        raise InvalidRequest(
            f"{param} holds {count} tokens or more; this server takes at most {settings.max_prompt_tokens}", param=param
        )


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = Field(False, description="a last chunk with the usage of the whole request")
    continuous_usage_stats: bool | None = Field(False, description="the usage so far on every chunk")


def logit_bias_entries(bias: dict[str, float] | None) -> dict[str, float] | None:
    """Keys are token ids written as decimal strings (JSON object keys are strings), as OpenAI's API has them."""
    for key in bias or {}:
        if not (len(key) <= 3 and key.isascii() and key.isdigit() and str(int(key)) == key and int(key) < VOCAB_SIZE):
            raise ValueError(f"keys must be token ids 0..{VOCAB_SIZE - 1} written as strings, got {key[:20]!r}")
    return bias


LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=VOCAB_SIZE),
    AfterValidator(logit_bias_entries),
]


class GenerationRequest(ConstraintFields):
    """The fields completions and chat completions share: the model, sampling, stops, streaming, constraints."""

    model_config = STRICT

    model: Text
    temperature: float | None = Field(SAMPLING.temperature, ge=0, le=2)
    # The float32 bounds are documented here and checked by SamplingParams.validate, whose message says why.
    top_p: float | None = Field(SAMPLING.top_p, gt=0, le=1, json_schema_extra={"minimum": FLOAT32_TINY})
    top_k: integer(ge=-1) | None = SAMPLING.top_k
    min_p: float | None = Field(SAMPLING.min_p, ge=0, le=1)
    presence_penalty: float | None = Field(SAMPLING.presence_penalty, ge=-2, le=2)
    frequency_penalty: float | None = Field(SAMPLING.frequency_penalty, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        SAMPLING.repetition_penalty, gt=0, json_schema_extra={"minimum": FLOAT32_TINY, "maximum": FLOAT32_MAX}
    )
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(None, validate_default=True)
    seed: integer(ge=-(2**63), lt=2**63) | None = Field(None, description="a signed 64-bit integer")
    n: integer(ge=1) | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: LogitBias | None = Field(None, description="token id -> bias in [-100, 100]; -100 bans the token")
    ignore_eos: bool | None = Field(
        None,
        description="a byte model has no end-of-sequence token; in chat, the chat template's end-of-turn stop "
        "strings play its part and are not applied (the request's own stop strings still are)",
    )
    min_tokens: integer(ge=0) | None = Field(
        None,
        description="no stop sequence (the request's or the chat template's) ends a choice before this many tokens",
    )

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        return [] if stop is None else [stop] if isinstance(stop, str) else stop


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: integer(ge=0) | None = Field(
        DEFAULT_MAX_TOKENS, description="0 reads the prompt only: with echo and logprobs, the prompt's scores"
    )
    echo: bool | None = False
    logprobs: integer(ge=0, le=20) | None = None
    best_of: integer(ge=1) | None = Field(
        None, description="candidates per prompt; the n with the highest total logprob are returned (not streamed)"
    )
    suffix: Text | None = Field(None, description="refused unless empty: this model cannot insert text")

    @classmethod
    def check_sizes(cls, data: dict[str, Any], settings: Settings) -> None:
        """Refuse over-long prompts from their lengths alone, before any of their items is validated."""
        prompt = data.get("prompt")
        batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = prompt if batch else [prompt]
        if len(prompts) > settings.max_sequences:
            raise InvalidRequest(
                f"prompt has {len(prompts)} items; at most {settings.max_sequences} prompts per request", param="prompt"
            )
        check_prompt_tokens(sum(len(item) for item in prompts if isinstance(item, (str, list))), settings, "prompt")


class TokenizeRequest(BaseModel):
    model_config = STRICT
    model: Text | None = None
    prompt: Text

    @classmethod
    def check_sizes(cls, data: dict[str, Any], settings: Settings) -> None:
        prompt = data.get("prompt")
        check_prompt_tokens(len(prompt) if isinstance(prompt, str) else 0, settings, "prompt")


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: Text | None = None
    tokens: Annotated[list[TokenId], Field(fail_fast=True)]

    @classmethod
    def check_sizes(cls, data: dict[str, Any], settings: Settings) -> None:
        tokens = data.get("tokens")
        check_prompt_tokens(len(tokens) if isinstance(tokens, list) else 0, settings, "tokens")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeResponse(BaseModel):
    prompt: str


class Logprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "windowlm"
    max_model_len: int | None = Field(None, description="context limit; None when the model has none")
    window_size: int
    look_backward: int
    depth: int = Field(description="attention layers in the model")
    attention_span: int = Field(
        description="positions one query of one layer sees at most, its own included: window_size * look_backward "
        "+ 1 for exact windows, window_size * (look_backward + 1) for bucketed ones"
    )
    receptive_field: int | None = Field(
        description="the last tokens of a text the next token can depend on (depth * window_size * look_backward "
        "+ 1); null when unbounded"
    )
    cpu_threads: int = Field(description="torch's CPU threads in this server")
    chat_template: Literal["checkpoint", "setting", "default"] = Field(
        description="the template /v1/chat/completions renders conversations with: the checkpoint's, the server's "
        "setting, or the default script format for base models"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
