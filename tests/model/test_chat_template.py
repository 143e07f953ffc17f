"""Chat templates: the default's exact prompt, a template in the style other ecosystems ship, and the sandbox."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from model.chat_template import ChatTemplate, ChatTemplateError, ConversationRefused

SCENE = [
    {"role": "system", "content": "A street in Verona."},
    {"role": "user", "content": "Good morrow. Who goes there?"},
    {"role": "assistant", "content": "A friend.", "name": "ROMEO"},
    {"role": "user", "content": "What news?\n"},
]

# A template in the style checkpoints in other ecosystems ship: turn markers, a required system prompt,
# tools as JSON, and a refusal of a conversation it cannot render.
MARKED = """\
{{ bos_token }}
{%- if messages[0].role != "system" %}
    {{- raise_exception("the first message must be a system message") }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ["system", "user", "assistant"] %}
        {{- raise_exception("unknown role " ~ message.role) }}
    {%- endif %}
<|{{ message.role }}|>
{% if message.name is defined %}({{ message.name }}) {% endif %}{{ message.content }}<|end|>
{% if loop.last and tools is defined %}
<|tools|>{{ tools | tojson }}<|end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{% endif %}"""


def template(source: str, stop: tuple[str, ...] = ()) -> ChatTemplate:
    return ChatTemplate(source, stop, "setting")


def test_the_default_renders_a_scene_ending_with_the_named_assistants_speaker_line() -> None:
    default = ChatTemplate.default()
    assert default.origin == "default" and default.stop == ("\n\n",)
    scene = "[A street in Verona.]\n\nUSER.\nGood morrow. Who goes there?\n\nROMEO.\nA friend.\n\nUSER.\nWhat news?\n\n"
    assert default.render(SCENE, add_generation_prompt=False) == scene
    assert default.render(SCENE) == scene + "ROMEO.\n"


def test_the_default_names_roles_and_answers_as_the_assistant_without_a_name() -> None:
    messages = [
        {"role": "developer", "content": "  Enter two lords.  "},
        {"role": "user", "content": "Speak.", "name": "HAMLET"},
        {"role": "assistant", "content": "I will.", "name": None},
        {"role": "tool", "content": "42"},
        {"role": "chorus", "content": "O for a muse of fire"},
    ]
    assert ChatTemplate.default().render(messages) == (
        "[Enter two lords.]\n\nHAMLET.\nSpeak.\n\nASSISTANT.\nI will.\n\nTOOL.\n42\n\n"
        "CHORUS.\nO for a muse of fire\n\nASSISTANT.\n"
    )
    assert ChatTemplate.default().render([]) == "ASSISTANT.\n"


def test_content_parts_and_null_content_become_strings() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Good"}, {"type": "text", "text": "night."}]},
        {"role": "assistant", "content": None},
    ]
    assert ChatTemplate.default().render(messages, add_generation_prompt=False) == (
        "USER.\nGood\nnight.\n\nASSISTANT.\n\n\n"
    )
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.content must be a string or a list of text parts"):
        ChatTemplate.default().render([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_a_template_in_the_common_style_renders_as_written() -> None:
    chat = template(MARKED, ("<|end|>",))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>", "name": "ann"}]
    tools = [{"name": "lookup", "description": "finds <things> & more", "parameters": {"z": 1, "a": "é"}}]
    assert chat.render(messages, tools=tools, bos_token="<s>") == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\n(ann) Hi <b><|end|>\n"
        '<|tools|>[{"name": "lookup", "description": "finds <things> & more", "parameters": {"z": 1, "a": "é"}}]'
        "<|end|>\n<|assistant|>\n"
    )
    assert chat.render(messages, add_generation_prompt=False).endswith("(ann) Hi <b><|end|>\n")


def test_raise_exception_refuses_the_conversation_with_its_message() -> None:
    chat = template(MARKED)
    with pytest.raises(ConversationRefused, match=r"^the first message must be a system message$"):
        chat.render([{"role": "user", "content": "Hi"}])
    with pytest.raises(ChatTemplateError, match=r"^unknown role tool$"):
        chat.render([{"role": "system", "content": "x"}, {"role": "tool", "content": "y"}])


def test_tojson_takes_the_usual_options() -> None:
    chat = template("{{ value | tojson(indent=2) }}|{{ value | tojson(sort_keys=True, separators=(',', ':')) }}")
    assert chat.render([], value={"b": [1], "a": None}) == '{\n  "b": [\n    1\n  ],\n  "a": null\n}|{"a":null,"b":[1]}'


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ ''.format.__self__.__class__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ messages | attr('__class__') }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{% set ns = namespace(x=1) %}{% set ns.__class__ = 1 %}",
]
FAILURES = [
    "{{ 'x' * 10000000 }}",
    "{{ [0] * 10000000 }}",
    "{{ 9 ** 99999999 }}",
    "{{ range(10000000) | list }}",
    "{% macro again() %}{{ again() }}{% endmacro %}{{ again() }}",
    "{{ 1 / 0 }}",
    "{{ undefined_thing.attribute }}",
    "{{ messages | tojson(bad_option=1) }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_the_sandbox_lets_nothing_out_and_changes_nothing_passed_in(source: str) -> None:
    """An unsafe attribute reads as undefined (empty) until it is used, and using it is an error."""
    messages = [{"role": "user", "content": "x"}]
    try:
        rendered = template(source).render(messages)
    except ChatTemplateError as error:
        assert str(error)
    else:
        assert rendered == ""
    assert messages == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("source", FAILURES)
def test_every_failure_while_rendering_is_a_chat_template_error(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="the chat template"):
        template(source).render([{"role": "user", "content": "x"}])


def test_a_runtime_failure_names_its_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"at line 3: .*unsafe"):
        template("a\nb\n{{ messages.pop() }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% for message in messages %}{{ message.content }}", r"does not compile: line 1: .*endfor"),
        ("ok\n{{ messages[ }}", r"does not compile: line 2: "),
        ("{% while true %}{% endwhile %}", r"does not compile: line 1: .*while"),
    ],
)
def test_a_template_that_does_not_compile_is_refused_on_construction(source: str, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        template(source)


def test_the_fields_are_checked() -> None:
    with pytest.raises(ChatTemplateError, match="non-empty strings"):
        ChatTemplate("x", ("",), "setting")
    with pytest.raises(ChatTemplateError, match="origin is one of"):
        ChatTemplate("x", (), "elsewhere")  # type: ignore[arg-type]
    assert ChatTemplate("x", ["a", "b"], "checkpoint").stop == ("a", "b")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ChatTemplate.default().source = "x"  # type: ignore[misc]
    assert ChatTemplate.default() == ChatTemplate.default()


def test_from_file_names_the_file_it_cannot_use(tmp_path: Path) -> None:
    good = tmp_path / "chat.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    loaded = ChatTemplate.from_file(good, ["END"], "setting")
    assert loaded.render([{"role": "user", "content": "hi"}]) == "hi" and loaded.stop == ("END",)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if %}", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=rf"^chat template file {bad}: the chat template does not compile"):
        ChatTemplate.from_file(bad, (), "setting")
    with pytest.raises(ChatTemplateError, match=r"missing\.jinja: cannot be read: No such file"):
        ChatTemplate.from_file(tmp_path / "missing.jinja", (), "setting")
    (tmp_path / "latin1.jinja").write_bytes(b"caf\xe9")
    with pytest.raises(ChatTemplateError, match=r"latin1\.jinja: cannot be read"):
        ChatTemplate.from_file(tmp_path / "latin1.jinja", (), "setting")


def test_renders_from_many_threads_agree() -> None:
    chat, results = ChatTemplate.default(), {}

    def render(index: int) -> None:
        results[index] = chat.render([{"role": "user", "content": f"line {index}"}])

    threads = [threading.Thread(target=render, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {index: f"USER.\nline {index}\n\nASSISTANT.\n" for index in range(8)}
