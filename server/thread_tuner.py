"""Threads that follow the host while the server runs: as many as the CPUs this process may use, less those other
processes keep busy.

torch splits each operator's work evenly over its threads and waits for the last. When another process keeps
one of the CPUs busy, the thread the scheduler parks behind it holds up every operator: on 2 CPUs beside one
busy process, 2 threads decoded 36-43 tokens/s where 1 thread decoded 135, the same as on a quiet machine
(`windowlm bench threads`, server/bench/README.md). No fixed count is right for both: on a quiet machine the
second thread reads prompts 1.7x faster.

So the engine thread asks a ThreadTuner between steps. About once a second it reads how busy the process's
CPUs were (/proc/stat) and how much of that was this process (/proc/self/stat); the rest is other processes'.
The threads are the CPUs of its affinity mask less that share, rounded to the nearest (half a CPU's worth of
others keeps every thread), at least 1, at most the CPUs this process may use (its quota), changed when two
readings in a row agree. It runs only when no thread count is given (a flag or WINDOWLM_THREADS) and only on Linux.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.threads import available_cpus

logger = logging.getLogger("windowlm")
PROC = Path("/proc")


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks (USER_HZ) since boot: busy on the CPUs watched, and this process's own."""

    busy: int
    ours: int
    at: float  # time.monotonic() of the reading


def busy_ticks(proc_stat: str, cpus: set[int]) -> int:
    """Ticks the given CPUs spent busy, from /proc/stat's text: every field of a `cpuN` line but idle and
    iowait (user, nice, system, irq, softirq, steal; guest time is already inside user)."""
    busy = 0
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = [int(value) for value in rest.split()]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
            busy += user + nice + system + irq + softirq + steal
    return busy


def process_ticks(proc_self_stat: str) -> int:
    """utime + stime of a process, from /proc/PID/stat's text (the command name may hold spaces and parens)."""
    fields = proc_self_stat[proc_self_stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line


def read_cpu_times(cpus: set[int], proc: Path = PROC) -> CpuTimes | None:
    try:
        stat, own = (proc / "stat").read_text(), (proc / "self" / "stat").read_text()
    except OSError:
        return None
    return CpuTimes(busy_ticks(stat, cpus), process_ticks(own), time.monotonic())


def others_share(earlier: CpuTimes, later: CpuTimes, ticks_per_second: float) -> float:
    """CPUs' worth of busy time other processes took between two readings."""
    seconds = later.at - earlier.at
    others = (later.busy - earlier.busy) - (later.ours - earlier.ours)
    return max(0.0, others / ticks_per_second / seconds) if seconds > 0 else 0.0


def threads_for(cpus: int, watched: int, others: float) -> int:
    """The threads for `cpus` usable CPUs (the affinity mask within the CPU quota) when other processes keep
    `others` CPUs' worth of the `watched` CPUs (the affinity mask) busy: under a quota of 2 on a 64-CPU host,
    others must fill 62 of them before a thread goes."""
    return max(1, min(cpus, math.floor(watched - others + 0.5)))


def thread_tuner(threads_given: bool, set_threads: Callable[[int], None] | None = None) -> ThreadTuner | None:
    """The tuner of a server whose threads were not given, on a host where it can read the CPU times and has
    more than one CPU to choose from; else None. `set_threads` as ThreadTuner's."""
    cpus = available_cpus()
    if threads_given or cpus < 2 or not hasattr(os, "sched_getaffinity"):
        return None
    if read_cpu_times(set(os.sched_getaffinity(0))) is None:
        return None
    return ThreadTuner(cpus, set_threads=set_threads)


class ThreadTuner:
    """Sets the calling thread's torch threads to `threads_for` the CPUs this process may use, re-read about once
    a second by `update` (cheap to call every step). `set_threads` is torch.set_num_threads unless given."""

    def __init__(
        self,
        cpus: int,
        *,
        cpu_ids: set[int] | None = None,
        interval: float = 1.0,
        set_threads: Callable[[int], None] | None = None,
        read: Callable[[], CpuTimes | None] | None = None,
    ) -> None:
        ids = set(os.sched_getaffinity(0)) if cpu_ids is None else cpu_ids
        self.cpus = cpus
        self.watched = len(ids)
        self.interval = interval
        self.read = read or (lambda: read_cpu_times(ids))
        self.ticks_per_second = float(os.sysconf("SC_CLK_TCK"))
        self.set_threads = torch.set_num_threads if set_threads is None else set_threads
        self.threads = cpus
        self.proposed: int | None = None
        self.others = 0.0
        self.last = self.read()

    def update(self) -> int:
        """Take a reading if one is due; change the threads when two in a row agree -> the threads now."""
        if self.last is None or time.monotonic() - self.last.at < self.interval:
            return self.threads
        reading = self.read()
        if reading is None:
            return self.threads
        self.others = others_share(self.last, reading, self.ticks_per_second)
        self.last = reading
        wanted = threads_for(self.cpus, self.watched, self.others)
        if wanted == self.threads:
            self.proposed = None
        elif wanted == self.proposed:
            self.apply(wanted)
        else:
            self.proposed = wanted
        return self.threads

    def apply(self, threads: int) -> None:
        logger.info(
            "torch threads: %d -> %d (other processes keep %.1f of %d CPUs busy)",
            self.threads,
            threads,
            self.others,
            self.watched,
        )
        self.set_threads(threads)
        self.threads, self.proposed = threads, None
