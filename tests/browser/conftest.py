"""A headless Chromium driven by Selenium, the servers it talks to, and where screenshots go.

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

import pytest

from tests.server.conftest import ServerProcess, bundled, relative_checkpoint  # noqa: F401 - fixtures used here

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
API_KEY = "browser-key"
FAULT_MARKER = "FAULT"  # a prompt holding it fails in its decode steps (server/faults.py)


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
