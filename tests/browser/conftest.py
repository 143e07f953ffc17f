"""A headless Chromium driven by Selenium, the servers it talks to, where screenshots go, and the moves the tests
make on the page (Selenium is imported where they use it: without it the browser tests skip before any runs).

The browser is Debian's `chromium` with its `chromium-driver`, named by path, so Selenium never looks for (or
downloads) a browser or driver of its own. Without them the browser tests skip, unless WINDOWLM_REQUIRE_BROWSER=1
(CI) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import ServerProcess, bundled, relative_checkpoint  # noqa: F401 - fixtures used here

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
API_KEY = "browser-key"
FAULT_MARKER = "FAULT"  # a prompt holding it fails in its decode steps (server/faults.py)
WAIT = 30  # seconds: a guard against a hang, never a pause


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return "Chromium not found: install Debian's chromium and chromium-driver"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for a test module."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size={},{}".format(*WINDOW),
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def keyed(relative_checkpoint: Path) -> Iterator[ServerProcess]:  # noqa: F811 - the fixture imported above
    """The small test model behind an API key, with prompts holding FAULT_MARKER failing mid-stream."""
    process = ServerProcess(
        relative_checkpoint, "--api-key", API_KEY, env={"WINDOWLM_INJECT_FAULTS": f"row={FAULT_MARKER}"}
    )
    yield process
    process.stop()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder for screenshots: $WINDOWLM_ARTIFACTS when set, else a temporary one."""
    given = os.environ.get("WINDOWLM_ARTIFACTS")
    folder = Path(given) if given else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- moves on the page ------------------------------------------------------------------------------------


def wait(driver: Any, condition: Any, timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda _: condition())


def element(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

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


def set_constraint(driver: Any, kind: str, text: str | None = None) -> None:
    """Choose a constraint kind and type its text (for the kinds that take one; None keeps the text it had)."""
    from selenium.webdriver.support.ui import Select

    Select(element(driver, "#constraint-kind")).select_by_value(kind)
    box = element(driver, "#constraint-text")
    if text is not None and box.is_displayed():
        box.clear()
        box.send_keys(text)


def choose_mode(driver: Any, mode: str) -> None:
    element(driver, f"#mode-{mode}").click()
    wait(driver, lambda: element(driver, f"#{mode}").is_displayed())


def finished(driver: Any) -> bool:
    """The answer is over (Send turns disabled as soon as it starts, at the click or the key)."""
    return element(driver, "#send").is_enabled()


def screenshot(driver: Any, folder: Path, name: str) -> None:
    driver.execute_script("document.getElementById('bands').scrollIntoView({block: 'end'})")
    path = folder / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def model_card(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]
