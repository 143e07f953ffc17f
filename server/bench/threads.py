"""`windowlm bench threads`: decode speed against torch's thread count and OpenMP wait policy, on a quiet machine
and beside one CPU-bound process, as JSON.

Settings: the default (no WINDOWLM_THREADS: the CPUs this process may use, less those other processes keep
busy, see server/thread_tuner.py), each fixed count of `--counts`, and the default under each OpenMP wait
policy of `--wait-policies` (the runtime's own policy spins a while before it sleeps). Each round starts one
`windowlm serve` per setting in turn, alone on the machine (an idle server's spinning threads would slow the
one measured), streams for `--settle` seconds (the default's threads follow the host within about two), and
measures one stream's tokens/s, then `--streams` streams' aggregate tokens/s (greedy, `--tokens` each). Then
the same with a competing process spinning on one CPU. Reported: the median over `--rounds` of each, and for
each situation the default's share of the best setting's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server.bench.arrivals import start
from server.bench.machine import finish_machine_state, machine_state
from server.bench.serve import one_round
from server.config import BUNDLED_WEIGHTS

WAIT_POLICY = "OMP_WAIT_POLICY"


def settings(counts: list[int], policies: list[str]) -> dict[str, dict[str, str]]:
    """Setting name -> the environment it changes (WINDOWLM_THREADS; OMP_WAIT_POLICY, empty for the runtime's)."""
    chosen = {"default": {}}
    chosen.update({f"{count} threads": {"WINDOWLM_THREADS": str(count)} for count in counts})
    chosen.update(
        {f"default, wait {policy}": {WAIT_POLICY: "" if policy == "default" else policy} for policy in policies}
    )
    return chosen


def start_with(root: Path, weights: Path, environment: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """A server with `environment` on top of this one's (WINDOWLM_THREADS and OMP_WAIT_POLICY cleared first)."""
    saved = {name: os.environ.pop(name, None) for name in ("WINDOWLM_THREADS", WAIT_POLICY)}
    try:
        os.environ.update(environment)
        return start(root, weights)
    finally:
        for name in ("WINDOWLM_THREADS", WAIT_POLICY):
            os.environ.pop(name, None)
            if saved[name] is not None:
                os.environ[name] = saved[name]


def competitor() -> subprocess.Popen:
    """A process that keeps one CPU busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(root: Path, weights: Path, chosen: dict[str, dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    """Median tokens/s of one stream and of `streams` streams for each setting, rounds in turns."""
    seen: dict[str, dict[str, list[float]]] = {name: {"one": [], "many": []} for name in chosen}
    for _ in range(args.rounds):
        for name, environment in chosen.items():
            process, port = start_with(root, weights, environment)
            try:
                settle = time.monotonic() + args.settle
                while time.monotonic() < settle:
                    asyncio.run(one_round(port, 1, 32))
                seen[name]["one"].append(asyncio.run(one_round(port, 1, args.tokens))["tokens_per_second"])
                many = asyncio.run(one_round(port, args.streams, args.tokens))
                seen[name]["many"].append(many["tokens_per_second"])
            finally:
                process.terminate()
                process.wait(60)
    return {
        name: {
            "one_stream_tokens_per_second": statistics.median(values["one"]),
            f"{args.streams}_streams_tokens_per_second": statistics.median(values["many"]),
        }
        for name, values in seen.items()
    }


def default_against_best(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """For each figure, the default's share of the best setting's (1.0: the default is the best)."""
    figures = next(iter(results.values())).keys()
    return {figure: results["default"][figure] / max(one[figure] for one in results.values()) for figure in figures}


def run_threads_bench(args: argparse.Namespace) -> dict[str, Any]:
    weights, here = Path(args.weights), Path(__file__).resolve().parents[2]
    machine = machine_state()
    chosen = settings(args.counts, args.wait_policies)
    quiet = measure(here, weights, chosen, args)
    busy = competitor()
    try:
        loaded = measure(here, weights, chosen, args)
    finally:
        busy.kill()
        busy.wait()
    report = {
        "machine": machine,
        "weights": str(weights),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "settings": chosen,
        "quiet": quiet,
        "beside_one_busy_process": loaded,
        "default_share_of_best": {"quiet": default_against_best(quiet), "loaded": default_against_best(loaded)},
    }
    finish_machine_state(machine)
    return report


def add_threads_bench_arguments(parser: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",")]

    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help="checkpoint to serve (default: bundled)")
    parser.add_argument("--counts", type=numbers, default=[1, 2], help="thread counts besides the default")
    parser.add_argument(
        "--wait-policies",
        type=lambda text: text.split(","),
        default=["PASSIVE", "ACTIVE"],
        help="OpenMP wait policies tried with the default threads",
    )
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of streaming before each measurement")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams of the aggregate figure")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every setting, in turns")
