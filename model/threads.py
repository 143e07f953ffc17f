"""How many CPU threads torch may use: as many as the CPUs this process may really run on, not every core the
machine has.

torch sizes its thread pool by the cores it sees. On a shared host, or in a container with a CPU limit, that
is more threads than the process gets to run: they wait on each other and on whatever else runs, and a decode
step gets 10-25x slower than on one thread. The CPUs a process may use are the fewest of

- its affinity mask (`taskset`, a cpuset cgroup): `os.sched_getaffinity`;
- its CPU quota: cgroup v2 `cpu.max` ("200000 100000" is two CPUs' worth; "max" is no limit) or cgroup v1
  `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: no limit), along the process's cgroup path, rounded down;

and at least 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger("windowlm")
CGROUP_ROOT = Path("/sys/fs/cgroup")
THREADS_HELP = "torch CPU threads (default: WINDOWLM_THREADS, else the CPUs this process may use)"


def parse_cpu_max(text: str) -> float | None:
    """CPUs' worth of a cgroup v2 `cpu.max` ("QUOTA PERIOD", QUOTA "max" for none) -> e.g. 1.5; None: no limit."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    quota = int(fields[0])
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs' worth of cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`; None when the quota is -1 (none)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(the v2 path, the v1 `cpu` controller's path) of a process, from /proc/self/cgroup's text."""
    unified = cpu = None
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            unified = path
        elif "cpu" in controllers.split(","):
            cpu = path
    return unified, cpu


def ancestors(root: Path, path: str) -> list[Path]:
    """`root/path` and each folder above it up to `root`: a limit anywhere on the way applies."""
    folders = [root]
    for part in Path(path).parts[1:]:
        folders.append(folders[-1] / part)
    return folders


def v2_quota(folder: Path) -> float | None:
    try:
        return parse_cpu_max((folder / "cpu.max").read_text())
    except (OSError, ValueError):
        return None


def v1_quota(folder: Path) -> float | None:
    try:
        return parse_cfs((folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota over the process's cgroups (v2 and v1), in CPUs; None when there is none."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    unified, cpu = cgroup_paths(proc_cgroup)
    quotas = []
    if unified is not None:
        quotas += [v2_quota(folder) for folder in ancestors(root, unified)]
    if cpu is not None:
        v1_root = root / "cpu" if (root / "cpu").is_dir() else root / "cpu,cpuacct"
        quotas += [v1_quota(folder) for folder in ancestors(v1_root, cpu)]
    limits = [quota for quota in quotas if quota is not None]
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """The CPUs this process may use: its affinity mask, within its cgroup quota rounded down, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def default_threads() -> int:
    """WINDOWLM_THREADS when set (every command reads it), else the CPUs this process may use."""
    given = os.environ.get("WINDOWLM_THREADS", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"WINDOWLM_THREADS must be a whole number of at least 1, got {given!r}")
        return int(given)
    return available_cpus()


def configure_threads(threads: int | None = None) -> int:
    """Size torch's thread pools: `threads`, else WINDOWLM_THREADS, else the CPUs this process may use. Returns
    the count set.

    The intra-op pool (one operator's work) gets them all; the inter-op pool (independent operators, which this
    project does not run) one thread, once (torch refuses to resize it after it has started)."""
    count = default_threads() if threads is None else threads
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # already started or already set: it keeps its size
        torch.set_num_interop_threads(1)
    source = "given" if threads is not None or os.environ.get("WINDOWLM_THREADS") else "the CPUs this process may use"
    logger.info("torch threads: %d (%s)", count, source)
    return count
