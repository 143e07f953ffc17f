"""Request and response bodies of POST /v1/chat/completions, OpenAI's chat API.

Every field of OpenAI's chat request schema is accepted with its type checked; what needs a capability this
model lacks (tools, images, audio) is refused with a 400 naming the field, by
`ChatCompletionRequest.refusal`. Fields that only steer a hosted service (store, metadata, service_tier, ...)
are accepted and have no effect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from server.config import Settings
from server.protocol import STRICT, GenerationRequest, Text, Usage, check_prompt_tokens, integer

MAX_MESSAGES = 4096  # a conversation's messages: each costs validation and rendering before its length is known
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(BaseModel):
    """One part of a message's content; only text parts can be read by this model."""

    model_config = STRICT
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Role
    content: Text | Annotated[list[ContentPart], Field(max_length=4096)] | None = None
    name: Text | None = None
    tool_calls: list[Any] | None = None
    function_call: Any | None = None


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: integer(ge=1) | None = Field(None, description="the older name of max_completion_tokens")
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: integer(ge=0, le=20) | None = None
    # Capabilities this model does not have: refused unless absent, null or empty.
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    parallel_tool_calls: bool | None = None
    audio: Any | None = None
    modalities: list[Text] | None = None
    prediction: Any | None = None
    web_search_options: Any | None = None
    # A hosted service's own controls: accepted, with no effect here.
    store: bool | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None
    reasoning_effort: Text | None = None
    verbosity: Text | None = None
    prompt_cache_key: Text | None = None
    safety_identifier: Text | None = None

    @classmethod
    def check_sizes(cls, data: dict[str, Any], settings: Settings) -> None:
        """Refuse conversations longer than the prompt limit from their text lengths alone (a lower bound of
        their tokens, counting at least one per message), before the messages are validated."""
        messages = data.get("messages")
        if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
            return  # validation refuses it, after one length check
        length = len(messages)
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                length += len(content)
            elif isinstance(content, list):
                texts = (part.get("text") for part in content if isinstance(part, dict))
                length += sum(len(text) for text in texts if isinstance(text, str))
        check_prompt_tokens(length, settings, "messages")

    def refusal(self) -> tuple[str, str] | None:
        """(param, why) for the first field that asks for something this model cannot do, else None."""
        wants_tools = bool(self.tools) or bool(self.functions)
        if wants_tools or self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            param = "tools" if self.tools else "functions" if self.functions else "tool_choice"
            return param, "this server has no tool calling"
        if self.audio is not None or (self.modalities and set(self.modalities) != {"text"}):
            return ("audio" if self.audio is not None else "modalities"), "this model reads and writes text only"
        if self.prediction is not None:
            return "prediction", "predicted outputs are not supported"
        if self.web_search_options is not None:
            return "web_search_options", "this server cannot search the web"
        return message_refusal(self.messages)

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def message_refusal(messages: list[ChatMessage]) -> tuple[str, str] | None:
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if message.role in ("tool", "function"):
            return f"{where}.role", f"{message.role} messages answer tool calls, which this server does not make"
        if message.tool_calls or message.function_call is not None:
            return f"{where}.tool_calls", "this server has no tool calling"
        for part_number, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "text" or part.text is None:
                return f"{where}.content[{part_number}]", f"a {part.type!r} part: this model reads text parts only"
        if message.content is None and message.role != "assistant":
            return f"{where}.content", f"a {message.role} message needs content"
    return None


def message_text(message: ChatMessage) -> str:
    """The message's text: its string, or its text parts joined by newlines."""
    if isinstance(message.content, list):
        return "\n".join(part.text or "" for part in message.content)
    return message.content or ""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
