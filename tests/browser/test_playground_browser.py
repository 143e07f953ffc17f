"""The playground in a real headless Chromium against real servers: answers stream in over many paints in both
modes, Stop and Escape free the server's slot, the server's own error messages reach the page (a 400 naming the
parameter, a 401 asking for the key, an error inside the stream), settings survive a reload, the receptive-field
bands cover the right bytes, and the page fits a phone in either colour scheme. Screenshots of both modes are
saved to $WINDOWLM_ARTIFACTS (else a temporary folder, printed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import API_KEY, FAULT_MARKER, browser_missing
from tests.server.conftest import ServerProcess

MISSING = browser_missing()
if MISSING is not None:
    if os.environ.get("WINDOWLM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{MISSING} (WINDOWLM_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402 - once the browser is known
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ANSWER = "#conversation .assistant:last-child .content"
EDITOR = "#editor"
WAIT = 30  # seconds: a guard against a hang, never a pause

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


def wait(driver: Any, condition: Any, timeout: float = WAIT) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda _: condition())


def element(driver: Any, selector: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, selector)


def open_page(driver: Any, server: ServerProcess, *, fresh: bool = True) -> None:
    """Load the playground; `fresh` forgets what an earlier test stored; wait for the model's facts (or an error)."""
    driver.get(server.url + "/")
    if fresh:
        driver.execute_script("localStorage.clear()")
        driver.get(server.url + "/")
    wait(driver, lambda: "window" in element(driver, "#facts").text or element(driver, "#error").is_displayed())


def set_field(driver: Any, name: str, value: str) -> None:
    field = element(driver, f'#params [name="{name}"]')
    field.clear()
    field.send_keys(value)


def choose_mode(driver: Any, mode: str) -> None:
    element(driver, f"#mode-{mode}").click()
    wait(driver, lambda: element(driver, f"#{mode}").is_displayed())


def finished(driver: Any) -> bool:
    """The answer is over (Send turns disabled as soon as it starts, at the click or the key)."""
    return element(driver, "#send").is_enabled()


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


def screenshot(driver: Any, folder: Path, name: str) -> None:
    driver.execute_script("document.getElementById('bands').scrollIntoView({block: 'end'})")
    path = folder / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def model_card(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]


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
