"""`windowlm bench prompt`: time to first token over HTTP against prompt length, as JSON.

A server on the given checkpoint (default: the bundled model) answers completions of one token for prompts of
each size, reading only the prompt's receptive field; a second server with `--read-whole-prompt` answers the
sizes up to `--whole-up-to` (reading every token of a megabyte prompt takes minutes on a CPU). Each figure is
the median of `--repeats` requests, timed by the client from sending the body to the whole answer, so it holds
the upload, the JSON parsing and the tokenizing of the prompt. Both servers raise `--max-body-bytes` and
`--max-prompt-tokens` to admit the largest prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from server.bench.machine import finish_machine_state, machine_state
from server.bench.serve import MODEL_ID, free_port, start_server
from server.config import BUNDLED_WEIGHTS

TEXT = (Path(__file__).resolve().parents[2] / "README.md").read_text().encode("ascii", "ignore").decode()


def prompt_of(size: int) -> str:
    """`size` bytes of English text (this project's README in ASCII, repeated)."""
    return (TEXT * (size // len(TEXT) + 1))[:size]


def seconds_to_first_token(port: int, size: int, repeats: int) -> float:
    """The median time of `repeats` completions of one token (the standard library's client: the benches run
    with the runtime dependencies only)."""
    body = json.dumps({"model": MODEL_ID, "prompt": prompt_of(size), "max_tokens": 1, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    times = []
    for _ in range(repeats):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, headers, method="POST")
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=3600) as response:  # raises HTTPError unless 2xx
            response.read()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(weights: Path, sizes: list[int], repeats: int, *flags: str) -> dict[str, float]:
    port = free_port()
    limits = ["--max-body-bytes", str(2 * max(sizes) + 4096), "--max-prompt-tokens", str(max(sizes))]
    server = start_server(weights, port, 4, *limits, *flags)
    try:
        seconds_to_first_token(port, 64, 2)  # warm up
        return {str(size): seconds_to_first_token(port, size, repeats) for size in sizes}
    finally:
        server.terminate()
        server.wait(60)


def run_prompt_bench(args: argparse.Namespace) -> dict[str, Any]:
    weights = Path(args.weights)
    machine = machine_state()
    shortcut = measure(weights, args.sizes, args.repeats)
    small = [size for size in args.sizes if size <= args.whole_up_to]
    whole = measure(weights, small, args.repeats, "--read-whole-prompt")
    smallest, largest = str(min(args.sizes)), str(max(args.sizes))
    report = {
        "machine": machine,
        "weights": str(weights),
        "repeats": args.repeats,
        "seconds_to_first_token": shortcut,
        "seconds_to_first_token_reading_whole_prompt": whole,
        "largest_over_smallest": shortcut[largest] / shortcut[smallest],
    }
    finish_machine_state(machine)
    return report


def add_prompt_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help="checkpoint to serve (default: bundled)")
    parser.add_argument(
        "--sizes", type=lambda s: [int(p) for p in s.split(",")], default=[1024, 65536, 1048576, 8388608]
    )
    parser.add_argument("--whole-up-to", type=int, default=65536, help="largest prompt also read whole")
    parser.add_argument("--repeats", type=int, default=3, help="requests per size (the median is kept)")
