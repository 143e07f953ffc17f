"""The CPUs a process may use: affinity, cgroup v2 `cpu.max` and cgroup v1 CFS quotas, read from sample
contents and a cgroup tree built for the test; `taskset` on a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.threads import available_cpus, cgroup_cpu_quota, cgroup_paths, parse_cfs, parse_cpu_max


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5), ("max", None)],
)
def test_cpu_max_contents(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


def test_cfs_contents() -> None:
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("300000\n", "100000\n") == 3.0


def test_cgroup_paths_of_v2_and_of_a_hybrid_v1_host() -> None:
    assert cgroup_paths("0::/kubepods/pod1/c1\n") == ("/kubepods/pod1/c1", None)
    hybrid = "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_paths(hybrid) == ("/", "/docker/abc")


def test_the_tightest_quota_on_the_cgroup_path_counts(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / "pod1"
    container = pod / "c1"
    container.mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (pod / "cpu.max").write_text("250000 100000\n")  # the pod: 2.5 CPUs
    (container / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path, "0::/kubepods/pod1/c1\n") == 2.5
    assert available_cpus(tmp_path, "0::/kubepods/pod1/c1\n") == min(2, len(os.sched_getaffinity(0)))
    (container / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert available_cpus(tmp_path, "0::/kubepods/pod1/c1\n") == 1


def test_a_v1_quota(tmp_path: Path) -> None:
    folder = tmp_path / "cpu" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("100000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path, "2:cpu,cpuacct:/docker/abc\n0::/\n") == 1.0
    assert available_cpus(tmp_path, "2:cpu,cpuacct:/docker/abc\n0::/\n") == 1


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path, "0::/somewhere\n") is None


def test_the_default_under_taskset_on_one_cpu_is_one_thread() -> None:
    """taskset comes with util-linux, on every Debian host."""
    code = "import torch, model.threads as t; t.configure_threads(); print(torch.get_num_threads())"
    command = ["taskset", "-c", "0", sys.executable, "-c", code]
    assert subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip() == "1"
