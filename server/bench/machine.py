"""The machine and the code a benchmark ran on, recorded in its JSON so that figures can be compared fairly."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds server/, model/ and weights/


def git(*arguments: str) -> str | None:
    """The output of a git command in the source folder, or None where it fails (no git, not a checkout)."""
    try:
        finished = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *arguments], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return finished.stdout.strip() if finished.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """The commit the code was checked out at and whether tracked files differ from it; both None when the code
    is not a git checkout of its own (an installed copy inside some other repository counts as none)."""
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_ROOT:
        return {"git_commit": None, "git_dirty": None}
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if changes is None else changes != ""}


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's on Linux, platform.processor() elsewhere (may be empty)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor()


def usable_cpus() -> int | None:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:  # not available on this system
        return None


def machine_state() -> dict[str, Any]:
    """The machine and the code, taken at the start of a benchmark, once its torch threads are set; the
    benchmark adds the load average at its end with `finish_machine_state`."""
    return {
        **code_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus_usable": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_average(),
    }


def finish_machine_state(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the load average at the end of the benchmark added."""
    state["load_average_after"] = load_average()
    return state
