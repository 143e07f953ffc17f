"""The playground in a real headless Chromium against real servers: answers stream in over many paints in both
modes, Stop and Escape free the server's slot, the server's own error messages reach the page (a 400 naming the
parameter, a 401 asking for the key, an error inside the stream), settings survive a reload, the receptive-field
bands cover the right bytes, and the page fits a phone in either colour scheme. Each kind of constraint is sent
under the field the API names and holds the answer to it; a schema that is not JSON is never sent, and the
server's word on a pattern or grammar it cannot compile is shown. Screenshots of both modes and of a constrained
answer are saved to $WINDOWLM_ARTIFACTS (else a temporary folder, printed)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.browser.conftest import (
    API_KEY,
    FAULT_MARKER,
    browser_missing,
    choose_mode,
    element,
    finished,
    model_card,
    open_page,
    screenshot,
    set_constraint,
    set_field,
    wait,
)
from tests.server.conftest import ServerProcess

MISSING = browser_missing()
if MISSING is not None:
    if os.environ.get("WINDOWLM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{MISSING} (WINDOWLM_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402 - once the browser is known
from selenium.webdriver.common.keys import Keys  # noqa: E402

ANSWER = "#conversation .assistant:last-child .content"
EDITOR = "#editor"

# Records, at every animation frame, how long the text of the element `arguments[0]` is (a textarea's value,
# else its text): each distinct length seen is text that was painted.
RECORD_PAINTS = """
window.paints = [];
window.recording = true;
const selector = arguments[0];
function frame() {
  const element = document.querySelector(selector);
  const length = element ? (element.value ?? element.textContent).length : 0;
  if (window.paints[window.paints.length - 1] !== length) window.paints.push(length);
  if (window.recording) requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
"""
# Keeps the JSON body of every request the page sends in window.sent, then sends it on.
RECORD_REQUESTS = """
window.sent = [];
const send = window.fetch;
window.fetch = (path, options) => {
  if (options?.body) window.sent.push(JSON.parse(options.body));
  return send(path, options);
};
"""
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def streamed(driver: Any, selector: str, start: Any) -> list[int]:
    """Start an answer with `start()`, wait for its end, and return the lengths painted meanwhile."""
    driver.execute_script(RECORD_PAINTS, selector)
    start()
    wait(driver, lambda: finished(driver))
    driver.execute_script("window.recording = false")
    return driver.execute_script("return window.paints")


def check_bands(driver: Any, text: str, card: dict) -> None:
    """The shaded bands are the last receptive_field and attention_span bytes of `text`."""
    bands = element(driver, "#bands-text")
    size = len(text.encode())
    field, window = element(driver, "#bands-text mark.band-field"), element(driver, "#bands-text mark.band-window")
    assert int(bands.get_attribute("data-field-bytes")) == len(field.get_attribute("textContent").encode())
    assert int(bands.get_attribute("data-window-bytes")) == len(window.get_attribute("textContent").encode())
    # a band edge inside a multi-byte character moves to its start: up to 3 bytes more
    assert 0 <= int(bands.get_attribute("data-field-bytes")) - min(size, card["receptive_field"]) <= 3
    assert 0 <= int(bands.get_attribute("data-window-bytes")) - min(size, card["attention_span"]) <= 3
    assert text.endswith(window.get_attribute("textContent"))


def test_a_chat_answer_streams_in_many_paints(browser: Any, bundled: ServerProcess, artifacts: Path) -> None:
    open_page(browser, bundled)
    set_field(browser, "seed", "1")
    set_field(browser, "max_tokens", "80")
    element(browser, "#system").send_keys("A street in Verona.")
    message = element(browser, "#chat-input")
    message.send_keys("Good morrow, friend.", Keys.SHIFT, Keys.ENTER, Keys.NULL, "What news?")
    paints = streamed(browser, ANSWER, lambda: message.send_keys(Keys.ENTER))  # Enter sends

    answer = element(browser, ANSWER).get_attribute("textContent")
    assert len({length for length in paints if length > 0}) >= 3, paints  # it grew at least twice
    assert paints[-1] == len(answer) > 0
    user = element(browser, "#conversation .user .content").get_attribute("textContent")
    assert user == "Good morrow, friend.\nWhat news?"  # Shift+Enter is a new line, not a send
    stats = element(browser, "#stats").text
    assert "first token" in stats and "tokens/s" in stats and "prompt" in stats, stats
    assert "server's template rendered it" in element(browser, "#bands-note").text
    conversation = f"[A street in Verona.]\n\nUSER.\n{user}\n\nASSISTANT.\n{answer}"
    check_bands(browser, conversation, model_card(bundled))
    screenshot(browser, artifacts, "playground-chat.png")


def test_a_completion_streams_into_the_editor(browser: Any, bundled: ServerProcess, artifacts: Path) -> None:
    open_page(browser, bundled)
    choose_mode(browser, "completion")
    set_field(browser, "seed", "7")
    set_field(browser, "max_tokens", "120")
    editor = element(browser, EDITOR)
    editor.clear()
    editor.send_keys("ROMEO.\nWhat light through yonder window breaks?\n")
    prompt = editor.get_attribute("value")
    paints = streamed(browser, EDITOR, lambda: element(browser, "#send").click())

    text = editor.get_attribute("value")
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert len({length for length in paints if length > len(prompt)}) >= 3, paints
    assert "120 tokens" in element(browser, "#stats").text  # the server's count, from the usage chunk
    check_bands(browser, text, model_card(bundled))
    screenshot(browser, artifacts, "playground-completion.png")


@pytest.mark.parametrize("how", ["button", "escape"])
def test_stop_frees_the_slot(browser: Any, bundled: ServerProcess, how: str) -> None:
    open_page(browser, bundled)
    choose_mode(browser, "completion")
    set_field(browser, "max_tokens", "16000")
    editor = element(browser, EDITOR)
    start = len(editor.get_attribute("value"))
    element(browser, "#send").click()
    wait(browser, lambda: len(editor.get_attribute("value")) > start + 20)
    assert bundled.metric("windowlm_kv_slots_used") == 1
    if how == "button":
        element(browser, "#stop").click()
    else:  # the key goes to the focused element, Stop since the click, and reaches the page's listener
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    wait(browser, lambda: element(browser, "#send").is_enabled(), timeout=5)
    assert "stopped" in element(browser, "#stats").text
    assert bundled.wait_metric("windowlm_kv_slots_used", 0, timeout=5) == 0
    assert not element(browser, "#error").is_displayed()


@pytest.mark.parametrize(("name", "value"), [("temperature", "5"), ("top_p", "2")])
def test_a_bad_parameter_shows_the_servers_400(browser: Any, bundled: ServerProcess, name: str, value: str) -> None:
    body = {"model": model_card(bundled)["id"], "prompt": "x", name: json.loads(value)}  # as the page sends it
    expected = httpx.post(f"{bundled.url}/v1/completions", json=body).json()["error"]["message"]
    assert name in expected
    open_page(browser, bundled)
    choose_mode(browser, "completion")
    set_field(browser, name, value)
    element(browser, "#send").click()
    wait(browser, lambda: element(browser, "#error").is_displayed())
    assert element(browser, "#error").text == expected


def test_a_key_is_asked_for_then_used(browser: Any, keyed: ServerProcess) -> None:
    open_page(browser, keyed)
    error = element(browser, "#error")
    assert error.is_displayed() and "needs an API key" in error.text, error.text
    element(browser, "#api-key").send_keys(API_KEY)
    wait(browser, lambda: "window" in element(browser, "#facts").text and not error.is_displayed())
    choose_mode(browser, "completion")
    set_field(browser, "max_tokens", "20")
    editor = element(browser, EDITOR)
    prompt = editor.get_attribute("value")
    element(browser, "#send").click()
    wait(browser, lambda: finished(browser))
    assert not error.is_displayed(), error.text
    assert len(editor.get_attribute("value")) > len(prompt)
    assert "20 tokens" in element(browser, "#stats").text
    assert browser.execute_script("return localStorage.getItem('windowlm.playground.api-key')") == API_KEY


def test_an_error_inside_the_stream_is_shown(browser: Any, keyed: ServerProcess) -> None:
    open_page(browser, keyed)
    element(browser, "#api-key").send_keys(API_KEY)
    wait(browser, lambda: "window" in element(browser, "#facts").text)
    choose_mode(browser, "completion")
    editor = element(browser, EDITOR)
    editor.clear()
    editor.send_keys(f"{FAULT_MARKER} in the third act")
    element(browser, "#send").click()
    wait(browser, lambda: element(browser, "#error").is_displayed())
    assert element(browser, "#error").text == (
        "The answer stopped with an error: the decode step failed: injected fault in a decode step"
    )


def test_settings_are_kept_across_a_reload(browser: Any, bundled: ServerProcess) -> None:
    open_page(browser, bundled)
    choose_mode(browser, "completion")
    values = {"temperature": "0.3", "top_k": "40", "seed": "9223372036854775807", "stop": "\\n\\n\nEXIT"}
    for name, value in values.items():
        set_field(browser, name, value)
    element(browser, "#api-key").send_keys("remembered-key")
    open_page(browser, bundled, fresh=False)
    for name, value in values.items():
        assert element(browser, f'#params [name="{name}"]').get_attribute("value") == value, name
    assert element(browser, "#completion").is_displayed() and not element(browser, "#chat").is_displayed()
    assert element(browser, "#api-key").get_attribute("value") == "remembered-key"


def test_the_page_fits_a_phone_in_the_dark(browser: Any, bundled: ServerProcess) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    browser.set_window_size(390, 844)
    try:
        open_page(browser, bundled)
        overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        assert browser.execute_script(overflow) <= 0
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(part) for part in background[background.index("(") + 1 : -1].split(",")[:3])
        assert red + green + blue < 150, background  # the dark scheme
        assert element(browser, "#send").is_displayed()
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        browser.set_window_size(1280, 900)


def constrained_answer(driver: Any, prompt: str) -> tuple[str, dict]:
    """Generate after `prompt` at temperature 0; the text generated and the request body the page sent."""
    choose_mode(driver, "completion")
    set_field(driver, "temperature", "0")
    set_field(driver, "max_tokens", "60")
    editor = element(driver, EDITOR)
    editor.clear()
    editor.send_keys(prompt)
    driver.execute_script(RECORD_REQUESTS)
    element(driver, "#send").click()
    wait(driver, lambda: finished(driver))
    assert not element(driver, "#error").is_displayed(), element(driver, "#error").text
    (body,) = driver.execute_script("return window.sent")
    return editor.get_attribute("value").removeprefix(prompt), body


def test_a_json_schema_holds_a_completion(browser: Any, bundled: ServerProcess, artifacts: Path) -> None:
    open_page(browser, bundled)
    set_constraint(browser, "json_schema", json.dumps(SCHEMA))
    text, body = constrained_answer(browser, "ROMEO.\nShall I hear more, or shall I speak at this?\n")
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "playground", "schema": SCHEMA}}
    jsonschema.validate(json.loads(text), SCHEMA)
    assert "finish: stop" in element(browser, "#stats").text
    browser.set_window_size(1280, 1200)  # tall enough for the Constraint box below the parameters
    try:
        screenshot(browser, artifacts, "playground-constraint.png")
    finally:
        browser.set_window_size(1280, 900)


@pytest.mark.parametrize(
    ("kind", "typed", "sent", "pattern"),
    [
        ("json_object", "", {"response_format": {"type": "json_object"}}, r"\{.*"),
        ("regex", "(yes|no)[.!]\n", {"structured_outputs": {"regex": "(yes|no)[.!]"}}, r"(yes|no)[.!]"),
        ("choice", "Verona\n\nMantua \n", {"structured_outputs": {"choice": ["Verona", "Mantua "]}}, "Verona|Mantua "),
        ("grammar", 'start: "ay" | "no"', {"structured_outputs": {"grammar": 'start: "ay" | "no"'}}, "ay|no"),
    ],
)
def test_each_constraint_is_sent_as_the_api_names_it(
    browser: Any, bundled: ServerProcess, kind: str, typed: str, sent: dict, pattern: str
) -> None:
    open_page(browser, bundled)
    set_constraint(browser, kind, typed)
    text, body = constrained_answer(browser, "JULIET.\nWhere art thou?\n")
    assert {name: body.get(name) for name in ("response_format", "structured_outputs") if name in body} == sent
    assert re.fullmatch(pattern, text, re.DOTALL), text


def test_a_chat_answer_is_one_of_the_choices(browser: Any, bundled: ServerProcess) -> None:
    open_page(browser, bundled)
    set_field(browser, "temperature", "0")
    set_constraint(browser, "choice", "Aye, madam.\nNo, madam.")
    element(browser, "#chat-input").send_keys("Is it day?", Keys.ENTER)
    wait(browser, lambda: finished(browser) and element(browser, ANSWER).text)
    assert element(browser, ANSWER).get_attribute("textContent") in {"Aye, madam.", "No, madam."}
    assert "finish: stop" in element(browser, "#stats").text


def test_a_schema_that_is_not_json_is_not_sent(browser: Any, bundled: ServerProcess) -> None:
    open_page(browser, bundled)
    set_constraint(browser, "json_schema", '{"type": "object",')
    browser.execute_script(RECORD_REQUESTS)
    element(browser, "#chat-input").send_keys("Speak.", Keys.ENTER)
    wait(browser, lambda: element(browser, "#error").is_displayed())
    error = element(browser, "#error").text
    assert error.startswith("The JSON schema is not valid JSON, so nothing was sent: "), error
    assert browser.execute_script("return window.sent") == []
    assert element(browser, "#constraint-text").get_attribute("aria-invalid") == "true"
    assert element(browser, "#constraint-note").text == error  # by the box too: the error line may be out of view
    assert element(browser, "#chat-input").get_attribute("value") == "Speak."  # kept, to send once it is fixed
    assert element(browser, "#conversation").get_attribute("childElementCount") == "0"


@pytest.mark.parametrize(
    ("kind", "typed"), [("regex", "[a-"), ("grammar", "start: ???"), ("json_schema", '{"type": "nope"}')]
)
def test_what_the_server_cannot_compile_is_its_400(browser: Any, bundled: ServerProcess, kind: str, typed: str) -> None:
    open_page(browser, bundled)
    choose_mode(browser, "completion")
    set_constraint(browser, kind, typed)
    browser.execute_script(RECORD_REQUESTS)
    element(browser, "#send").click()
    wait(browser, lambda: element(browser, "#error").is_displayed())
    (body,) = browser.execute_script("return window.sent")
    expected = httpx.post(f"{bundled.url}/v1/completions", json=body).json()["error"]["message"]
    assert ": invalid " in expected, expected  # the compiler's word, naming the field
    assert element(browser, "#error").get_attribute("textContent") == expected
    assert element(browser, "#constraint-text").get_attribute("aria-invalid") == "true"


def test_the_constraint_is_kept_across_a_reload(browser: Any, bundled: ServerProcess) -> None:
    open_page(browser, bundled)
    set_constraint(browser, "regex", "a+")
    set_constraint(browser, "choice", "one\ntwo")
    open_page(browser, bundled, fresh=False)
    assert element(browser, "#constraint-kind").get_attribute("value") == "choice"
    assert element(browser, "#constraint-text").get_attribute("value") == "one\ntwo"
    set_constraint(browser, "regex")  # each kind keeps its own text
    assert element(browser, "#constraint-text").get_attribute("value") == "a+"
