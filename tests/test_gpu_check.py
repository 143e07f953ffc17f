"""The GPU check's own parts, tried here: the packages it installs from wheels follow pyproject.toml, its script
passes shellcheck, and its summary reads the reports the benchmarks write."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import gpu_packages  # noqa: E402  (a script of .ci, not a package)


def test_the_wheels_cover_every_runtime_dependency_but_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {gpu_packages.name_of(spec) for spec in gpu_packages.packages()}
    runtime = {gpu_packages.name_of(spec) for spec in project["dependencies"]}
    assert runtime - names == {"torch"}
    assert {"pytest", "openai", "local-attention"} <= names
    split = gpu_packages.packages(no_deps_only=True) + gpu_packages.packages(with_deps_only=True)
    assert sorted(split) == sorted(gpu_packages.packages())
    assert all(gpu_packages.name_of(spec) in gpu_packages.NEEDS_TORCH for spec in gpu_packages.packages(True))


def test_the_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", str(ROOT / ".ci/gpu-check.sh")], capture_output=True)
    assert result.returncode == 0, result.stdout.decode()


def test_the_summary_reads_the_benchmark_reports(tmp_path: Path) -> None:
    (tmp_path / "gpu-tests.txt").write_text("....\n33 passed in 12.0s\n")
    decode = {
        "device": {"type": "cuda", "dtype": "bfloat16", "name": "NVIDIA H200", "peak_memory_allocated_mib": 812.5},
        "batched_tokens_per_second": {"1": 900.0, "256": 150000.0},
        "decode_ms_per_token": {"512": 1.1, "65536": 1.2},
        "context_ratio_largest_to_smallest": 1.09,
    }
    (tmp_path / "decode.json").write_text(json.dumps(decode))
    (tmp_path / "serve.json").write_text(json.dumps({"http_tokens_per_second": {"64": 20000.0}}))
    summary = subprocess.run(
        [sys.executable, str(ROOT / ".ci/gpu_summary.py"), str(tmp_path), "1"], capture_output=True, text=True
    ).stdout
    for line in (
        "GPU tests: 33 passed",
        "device: NVIDIA H200 bfloat16",
        "decode tokens/s at batch 256: 150000.0",
        "ms per token at context 65536: 1.2",
        "HTTP tokens/s at 64 streams: 20000.0",
    ):
        assert line in summary, summary


@pytest.mark.parametrize("missing", ["decode.json", "serve.json"])
def test_a_missing_report_is_named_not_a_traceback(tmp_path: Path, missing: str) -> None:
    (tmp_path / ("serve.json" if missing == "decode.json" else "decode.json")).write_text("{}")
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci/gpu_summary.py"), str(tmp_path), "0"], capture_output=True, text=True
    )
    assert result.returncode == 0 and f"{missing}:" in result.stdout
