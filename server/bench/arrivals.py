"""`windowlm bench arrivals`: what simultaneous prompts cost, over HTTP, as JSON.

For each server (this checkout at each `--budgets` value of `--prompt-tokens-per-step`, and optionally a
`--baseline-root` checkout of older code, started the same way from its own folder):

- time to first token of N streaming completions of `--prompt-bytes` prompts sent at once, for each N of
  `--counts` (p50 and p99 over every request of every round);
- the inter-token gaps of one running stream while `--burst` such prompts arrive: from sending them until the
  last of them has its first token (p50, p99 and the longest), against the stream's gaps before they came.

The servers run side by side, idle but for the one measured, and are measured in turns, a round of every
server at a time, so a slow spell of the machine touches them all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from server.bench.machine import finish_machine_state, machine_state
from server.bench.prompt import prompt_of
from server.bench.serve import MODEL_ID, free_port, percentiles, start_server
from server.config import BUNDLED_WEIGHTS

SLOTS = 96  # every arrival and the running stream hold a slot at once: nothing waits in the queue


def start(root: Path, weights: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`windowlm serve` from the checkout at `root`, once ready -> the process and its port."""
    port = free_port()
    return start_server(weights.resolve(), port, SLOTS, *flags, root=root), port


async def stream(port: int, prompt: str, max_tokens: int, events: list[float] | None = None) -> dict[str, Any]:
    """One streaming completion over a bare connection -> when it was sent and when each data event came
    (events that arrive in one read share its time), noted in `events` as they come."""
    request = {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body = json.dumps(request).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    events = [] if events is None else events
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    status = b""
    try:
        while data := await reader.read(65536):
            status = status or data.split(b"\r\n", 1)[0]
            events += [time.perf_counter()] * data.count(b"data: {")
    finally:
        writer.close()
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status.decode(errors='replace')}")
    return {"sent": sent, "first": events[0]}


def prompts(count: int, size: int, salt: int) -> list[str]:
    """`count` different prompts of `size` bytes (each its own slice of the text)."""
    text = prompt_of(size + 61 * count + 97)
    return [text[61 * i + salt % 97 :][:size] for i in range(count)]


async def arrivals(port: int, count: int, size: int, tokens: int, salt: int) -> list[float]:
    """Seconds to first token of `count` prompts sent at once."""
    results = await asyncio.gather(*(stream(port, p, tokens) for p in prompts(count, size, salt)))
    return [r["first"] - r["sent"] for r in results]


async def gaps_while_prompts_arrive(port: int, burst: int, size: int, tokens: int, salt: int) -> dict[str, list[float]]:
    """A running stream's inter-token gaps for a second before `burst` prompts arrive, and from sending them
    until the last has its first token."""
    times: list[float] = []
    running = asyncio.create_task(stream(port, prompt_of(size), 16384, times))
    while len(times) < 2:
        if running.done():
            running.result()  # raises what ended the stream
            raise RuntimeError("the running stream ended before its second token")
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)
    sent = time.perf_counter()
    results = await asyncio.gather(*(stream(port, p, tokens) for p in prompts(burst, size, salt)))
    all_read = max(r["first"] for r in results)
    running.cancel()
    gaps = [(later, later - earlier) for earlier, later in itertools.pairwise(times[1:])]
    return {
        "before": [gap for at, gap in gaps if at < sent],
        "during": [gap for at, gap in gaps if sent <= at <= all_read],
    }


async def one_round(port: int, args: argparse.Namespace, salt: int) -> dict[str, Any]:
    ttft = {count: await arrivals(port, count, args.prompt_bytes, args.arrival_tokens, salt) for count in args.counts}
    gaps = await gaps_while_prompts_arrive(port, args.burst, args.prompt_bytes, args.arrival_tokens, salt)
    return {"ttft": ttft, **gaps}


def summary(rounds: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    def pooled(key: str) -> list[float]:
        return [value for one in rounds for value in one[key]]

    during = pooled("during")
    return {
        "ttft_seconds": {
            str(count): percentiles([value for one in rounds for value in one["ttft"][count]]) for count in counts
        },
        "inter_token_seconds_before_burst": percentiles(pooled("before")),
        "inter_token_seconds_during_burst": {**percentiles(during), "max": max(during, default=0.0)},
    }


def run_arrivals_bench(args: argparse.Namespace) -> dict[str, Any]:
    weights, here = Path(args.weights), Path(__file__).resolve().parents[2]
    machine = machine_state()
    servers = {f"budget {budget}": (here, ["--prompt-tokens-per-step", str(budget)]) for budget in args.budgets}
    if args.baseline_root:
        servers = {"baseline": (Path(args.baseline_root).resolve(), []), **servers}
    started = {name: start(root, weights, *flags) for name, (root, flags) in servers.items()}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for number in range(args.rounds):
            for name, (_, port) in started.items():
                rounds[name].append(asyncio.run(one_round(port, args, salt=number)))
    finally:
        for process, _ in started.values():
            process.terminate()
            process.wait(60)
    report = {
        "machine": machine,
        "weights": str(weights),
        "prompt_bytes": args.prompt_bytes,
        "arrival_max_tokens": args.arrival_tokens,
        "burst": args.burst,
        "rounds": args.rounds,
        "baseline_commit": baseline_commit(args.baseline_root),
        "servers": {name: summary(one, args.counts) for name, one in rounds.items()},
    }
    finish_machine_state(machine)
    return report


def baseline_commit(root: str | None) -> str | None:
    if not root:
        return None
    done = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def add_arrivals_bench_arguments(parser: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",")]

    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help="checkpoint to serve (default: bundled)")
    parser.add_argument("--counts", type=numbers, default=[1, 16, 64], help="prompts sent at once")
    parser.add_argument("--burst", type=int, default=16, help="prompts arriving beside a running stream")
    parser.add_argument("--prompt-bytes", type=int, default=512)
    parser.add_argument("--arrival-tokens", type=int, default=16, help="max_tokens of each arriving prompt")
    parser.add_argument("--budgets", type=numbers, default=[512, 1024, 2048, 8192], help="--prompt-tokens-per-step")
    parser.add_argument("--baseline-root", help="also serve from this checkout (of older code), with its defaults")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every server, in turns")
