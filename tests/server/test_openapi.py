"""The OpenAPI document tells the truth: schemathesis, run over the whole API of a real server, finds no 5xx, no
undocumented status code, content type or header, no response that violates the document, and no schema-invalid
request accepted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

KEY = "schema-key"
# Every check but one: `positive_data_acceptance` expects every schema-valid body to be served, but some valid
# bodies are refused by rules a JSON schema does not hold (stream_options needs stream=true) or by the server's
# own limits (max_n, max_tokens_limit), with a documented 400.
CHECKS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]


@pytest.mark.slow
def test_schemathesis_finds_nothing(relative_checkpoint, tmp_path: Path) -> None:
    server = ServerProcess(relative_checkpoint, "--api-key", KEY, "--max-tokens-limit", "32")
    try:
        assert httpx.get(f"{server.url}/openapi.json").status_code == 401  # the document is behind the key too
        command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json", *CHECKS]
        command += ["--header", f"Authorization: Bearer {KEY}", "--max-examples", "40", "--seed", "7"]
        command += ["--workers", "1", "--generation-database", "none", "--no-color"]
        command += ["--report-dir", str(tmp_path / "report")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    finally:
        server.stop()


def test_the_document_lists_what_each_route_answers(server: ServerProcess) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    completions = document["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) >= {"200", "400", "404", "413", "429", "431", "500", "503"}
    assert "422" not in completions["responses"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert completions["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("CompletionRequest")
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert any(kind.startswith("text/plain") for kind in metrics)
    assert "securitySchemes" not in document.get("components", {})  # this server has no key
