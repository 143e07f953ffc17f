"""Chat templates: how a conversation (OpenAI chat `messages`) becomes the prompt text a model continues.

A template is Jinja2 text, as checkpoints in other ecosystems ship theirs, rendered with the variables those
templates expect, so an existing one works unchanged: `messages` (dicts with `role`, `content` as a string and
`name` when given), `add_generation_prompt`, `bos_token` and `eos_token` (empty: a byte model has neither),
`raise_exception(message)` to refuse a conversation, `strftime_now(format)`, the `tojson` filter, and
`{% break %}` / `{% continue %}`. Templates come with checkpoints or settings, so they run in Jinja2's
immutable sandbox: no attribute starting with `_`, no mutation of the values passed in, no reaching Python
objects beyond them; any failure while compiling or rendering one is a ChatTemplateError, never anything else.

Cost: the sandbox keeps a template from escaping, not from spending. Jinja2 has no `while` and caps `range` at
100,000 items, and here repetition (`'x' * n`) and powers are capped too, so the plain ways a template could
blow up are closed; but filters such as `replace`, `center` and `format`, or nested loops, can still build large
strings or run long if a template is written to. A template is therefore trusted like the weights it comes with
(and a setting's like the rest of the server's configuration): an ordinary template renders a conversation, which
the server has already limited in size, in time proportional to it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

from jinja2 import Template, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["DEFAULT_SOURCE", "DEFAULT_STOP", "ChatTemplate", "ChatTemplateError", "ConversationRefused", "Origin"]

Origin = Literal["checkpoint", "setting", "default"]
ORIGINS: tuple[str, ...] = get_args(Origin)
MAX_REPEATED_ITEMS = 1 << 20  # the longest string or list `*` may build
MAX_EXPONENT = 4096  # the largest integer power `**` may compute

# The default template: the conversation as a scene of a play, the shape of the bundled model's training text
# (the Project Gutenberg plays: a speaker's name in capitals with a period on its own line, the speech, a blank
# line; stage directions in brackets). See ChatTemplate.default for why and an example.
DEFAULT_SOURCE = """\
{%- set speakers = {"user": "USER", "assistant": "ASSISTANT", "tool": "TOOL"} %}
{%- set cast = namespace(answerer="ASSISTANT") %}
{%- for message in messages %}
    {%- if message.role in ["system", "developer"] %}
        {{- "[" ~ message.content | trim ~ "]\\n\\n" }}
    {%- else %}
        {%- if message.role == "assistant" and message.name %}
            {%- set cast.answerer = message.name %}
        {%- endif %}
        {{- (message.name or speakers.get(message.role, message.role | upper)) ~ ".\\n" }}
        {{- message.content | trim ~ "\\n\\n" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- cast.answerer ~ ".\\n" }}
{%- endif %}
"""
DEFAULT_STOP = ("\n\n",)  # the blank line that ends a speech: the model stops before the next speaker


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered; the message says why, with the line when known."""


class ConversationRefused(ChatTemplateError):
    """The template refused the conversation through raise_exception(message): the conversation is at fault."""


class _Refusal(Exception):
    """What raise_exception raises inside a render; render turns it into ConversationRefused."""


def _raise_exception(message: object = "the chat template refused the conversation") -> None:
    raise _Refusal(str(message))


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(
    value: Any,
    indent: int | str | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON as templates for chat models expect it: keys in their order and no HTML escaping (jinja2's own
    tojson sorts keys and writes `<` as \\u003c, since it is made for HTML; a prompt is not HTML)."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` refused where they would build something enormous."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                repeats = isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
                if repeats and len(sequence) * count > MAX_REPEATED_ITEMS:
                    raise SecurityError(f"repetition longer than {MAX_REPEATED_ITEMS} items")
        elif operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent larger than {MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


@functools.cache
def _environment() -> _ChatEnvironment:
    environment = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return environment


@functools.lru_cache(maxsize=32)
def _compiled(source: str) -> Template:
    """The compiled template of `source` (cached: a ChatTemplate compiles once, on construction)."""
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not compile: line {error.lineno}: {error.message}") from None
    except (RecursionError, MemoryError) as error:
        raise ChatTemplateError(f"the chat template does not compile: {type(error).__name__}") from None


def _template_line(traceback: TracebackType | None) -> int | None:
    """The template line of the innermost frame Jinja2 rewrote to point into the template, if any."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<template>":
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def _render_failure(error: BaseException) -> ChatTemplateError:
    line = _template_line(error.__traceback__)
    where = "" if line is None else f" at line {line}"
    if isinstance(error, RecursionError):
        return ChatTemplateError(f"the chat template recursed too deeply{where}")
    reason = getattr(error, "message", None) or str(error) or type(error).__name__
    return ChatTemplateError(f"the chat template failed{where}: {reason}")


def _text_of(content: Any, index: int) -> str:
    """A message's content as one string: a string, null (an assistant turn with only tool calls), or a list
    of text parts (`{"type": "text", "text": ...}`), joined by newlines (as the server joins them)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "\n".join(part["text"] for part in content)
    raise ChatTemplateError(f"messages[{index}].content must be a string or a list of text parts")


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages with content as a string and no `name` when it is null."""
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{index}] must be an object, got {type(message).__name__}")
        copy = {key: value for key, value in message.items() if not (key == "name" and value is None)}
        copy["content"] = _text_of(message.get("content"), index)
        prepared.append(copy)
    return prepared


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled-once Jinja2 chat template, the stop strings that end the model's turn, and where it came from.

    Constructing one compiles it: a template that does not compile raises ChatTemplateError here, not at
    the first request.
    """

    source: str  # the Jinja2 template text
    stop: tuple[str, ...]  # end-of-turn stop strings that end the assistant's answer
    origin: Origin  # where it came from (shown by /v1/models)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise ChatTemplateError(f"a chat template must be text, got {type(self.source).__name__}")
        stop = tuple(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop
        if not isinstance(stop, tuple) or not all(isinstance(text, str) and text for text in stop):
            raise ChatTemplateError(f"chat template stop strings must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.origin not in ORIGINS:
            raise ChatTemplateError(f"a chat template's origin is one of {list(ORIGINS)}, got {self.origin!r}")
        _compiled(self.source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt for `messages`; with add_generation_prompt it ends where the assistant's answer begins.

        `variables` reach the template too (they may replace bos_token and eos_token). Raises
        ConversationRefused when the template calls raise_exception, ChatTemplateError for any other failure.
        """
        context = {
            "bos_token": "",
            "eos_token": "",
            **variables,
            "messages": _template_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _compiled(self.source).render(context)
        except _Refusal as refusal:
            raise ConversationRefused(str(refusal)) from None
        except Exception as error:  # an untrusted template fails in many ways; each is the template's failure
            raise _render_failure(error) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], stop: tuple[str, ...] | list[str], origin: Origin) -> ChatTemplate:
        """The template in the UTF-8 file `path`; an unreadable or uncompilable one raises ChatTemplateError
        whose message begins with the file's name."""
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ChatTemplateError(f"chat template file {path}: cannot be read: {reason}") from None
        try:
            return cls(source, tuple(stop), origin)
        except ChatTemplateError as error:
            raise ChatTemplateError(f"chat template file {path}: {error}") from None

    @classmethod
    def default(cls) -> ChatTemplate:
        """For a model without a template of its own: the conversation as a scene of a play, for the model to
        continue as the next speaker, stopping at the blank line that ends the speech.

        The shape is the bundled model's training text (the Project Gutenberg plays), so a base model trained
        on scripts answers as a character: each message is a speech, its speaker's name on a line of its own
        followed by a period, then the text, then a blank line. The speaker is the message's `name` when
        given, else USER, ASSISTANT or TOOL (any other role in capitals): names in capitals, like the plays'
        speaker lines, and plain enough that a client reading the prompt knows who is who. System and
        developer messages are stage directions: the text in brackets, without a speaker. With
        add_generation_prompt the prompt ends with the answering speaker's line: the name of the last named
        assistant message (so a client can cast the model as a character), else ASSISTANT.

            [A street in Verona.]

            USER.
            Good morrow. Who goes there?

            ROMEO.
            A friend.

            USER.
            What news?

            ROMEO.

        (from a system message, user, assistant named ROMEO, user; the last line is the generation prompt.)
        """
        return cls(DEFAULT_SOURCE, DEFAULT_STOP, "default")
