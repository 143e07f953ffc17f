"""`windowlm bench soak` for a minute, through the real command line: the server must come through unharmed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import make_checkpoint

SECONDS = 60


@pytest.mark.slow
def test_a_minute_of_careless_and_hostile_clients_leaves_the_server_clean(tmp_path: Path) -> None:
    weights = make_checkpoint(tmp_path / "ckpt", use_abs_pos_emb=False, max_seq_len=1)
    command = [sys.executable, "-m", "server.cli", "bench", "soak", "--weights", str(weights)]
    command += ["--duration", str(SECONDS), "--max-batch-size", "4", "--max-queue", "8", "--load", "2"]
    command += ["--out", str(tmp_path / "soak.json")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 240)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert json.loads((tmp_path / "soak.json").read_text()) == report
    context = json.dumps(report, indent=2)

    assert report["settings"]["clients"] == 8
    assert report["server_5xx"] == 0, context
    assert report["error_events"] == 0, context
    assert report["protocol_errors"] == {}, context
    assert report["client_errors"] == {}, context
    assert report["token_mismatches"] == 0, context
    assert report["completed_streams"] >= 10, context  # a floor for a shared 2-core machine under other load
    assert report["disconnected_streams"] > 0, context
    assert report["nonreading_streams"] > 0, context
    assert report["slots_in_use_at_end"] == 0, context
    assert report["requests_waiting_at_end"] == 0, context
    rss = report["rss_mb"]
    assert rss["end"] - rss["start"] < 50, context
    assert report["server_exit_code"] == 0, context
