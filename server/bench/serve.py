"""`windowlm bench serve`: the whole HTTP path under N concurrent streaming clients, as JSON (and a PNG).

It starts `windowlm serve` as a subprocess, drives it with N concurrent streaming completions per round, and
measures what a client sees: time to first token, inter-token latency, end-to-end time and aggregate tokens/s.
For the overhead of HTTP and SSE it also runs the same load on the engine alone, in process (sampling included),
and reports the model's raw batched decode (no sampling) at the same batch size. The server, the engine alone
and the raw decode all run on --device in --dtype (the CPU in float32 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import torch

from model.sampling import SamplingParams
from model.threads import THREADS_HELP, configure_threads
from server.bench.decode import batched_tokens_per_second_in_turns
from server.bench.machine import finish_machine_state, machine_state
from server.bench.timing import (
    BENCH_MODEL,
    DTYPES,
    add_device_arguments,
    device_state,
    finish_device_state,
    resolve_device,
)
from server.engine import Engine, EngineRequest, FinishEvent, TokenEvent
from server.metrics import Metrics

MODEL_ID = "bench"
GREEDY = SamplingParams(temperature=0)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def bench_checkpoint(folder: Path) -> Path:
    """The decode bench's model, without absolute positions, random weights."""
    from weights.io import ModelConfig, save_checkpoint

    torch.manual_seed(0)
    config = ModelConfig(**dict(BENCH_MODEL, max_seq_len=1, use_abs_pos_emb=False))
    return save_checkpoint(config.build(), folder, config=config)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    weights: Path,
    port: int,
    max_batch_size: int,
    *flags: str,
    log: IO[str] | None = None,
    root: Path | None = None,
    ready_within: float = 120,
) -> subprocess.Popen:
    """`windowlm serve` on 127.0.0.1:`port` with more `flags`, its output to `log` (default: nowhere), once ready
    (within `ready_within` seconds); from the checkout at `root` (another version of this code) when given."""
    command = [sys.executable, "-m", "server.cli", "serve", "--weights", str(weights), "--port", str(port)]
    command += ["--model-name", MODEL_ID, "--max-batch-size", str(max_batch_size), "--log-level", "warning", *flags]
    environment = None if root is None else {**os.environ, "PYTHONPATH": str(root)}
    output = log or subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=root, env=environment, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1):
                return process
        except OSError:  # not listening yet, or 503 while the weights load
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready")


def completion_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_stream(port: int, request: dict[str, Any], path: str = "/v1/completions") -> dict[str, Any]:
    """One streaming request over a bare HTTP/1.1 connection: the client does as little work as it can (it
    shares the machine's cores with the server), noting when data events arrive and parsing only the usage."""
    body = json.dumps(request).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    first = last = None
    received = bytearray()
    while data := await reader.read(65536):
        if b"data: {" in data:
            last = time.perf_counter()
            first = last if first is None else first
        received += data
    writer.close()
    status = received.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status.decode()}")
    usage = received[received.rindex(b'"usage":') + 8 :]
    tokens = json.loads(usage[: usage.index(b"}") + 1])["completion_tokens"]
    return {"started": started, "first": first, "last": last, "tokens": tokens}


async def one_round(port: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    prompts = [f"Client {i} asks for a long answer: " for i in range(concurrency)]
    results = await asyncio.gather(*(one_stream(port, completion_body(p, max_tokens)) for p in prompts))
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    itl = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_seconds": percentiles([r["first"] - r["started"] for r in results]),
        "inter_token_seconds": percentiles(itl),
        "e2e_seconds": percentiles([r["last"] - r["started"] for r in results]),
    }


def engine_tokens_per_second(model: torch.nn.Module, concurrency: int, max_tokens: int) -> float:
    """The same load on the engine alone, in this process and without HTTP: the engine loop runs on this (main)
    thread as in `windowlm serve`, and a consumer on an event loop thread takes the tokens."""
    engine = Engine(model, max_batch_size=concurrency, max_queue=concurrency, metrics=Metrics())
    measured: dict[str, float] = {}

    async def consume() -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = [
            EngineRequest(list(f"Client {i} asks for a long answer: ".encode()), GREEDY, max_tokens, loop, events, i)
            for i in range(concurrency)
        ]
        while not engine.alive:
            await asyncio.sleep(0.01)
        warm_up = EngineRequest([1, 2, 3], GREEDY, 32, loop, asyncio.Queue())
        engine.submit([warm_up])
        while not isinstance((await warm_up.events.get())[1], FinishEvent):
            pass
        started = time.perf_counter()
        engine.submit(requests)
        finished = tokens = 0
        while finished < concurrency:
            tag, event = await events.get()
            finished += isinstance(event, FinishEvent)
            if isinstance(event, TokenEvent):
                tokens += 1
                requests[tag].mark_delivered(1)  # as the HTTP side does: unread tokens would pause the slot
        measured["tokens_per_second"] = tokens / (time.perf_counter() - started)

    def consumer() -> None:
        try:
            asyncio.run(consume())
        finally:
            engine.shutdown()

    thread = threading.Thread(target=consumer)
    thread.start()
    engine.run_forever()
    thread.join()
    return measured["tokens_per_second"]


def plot(rounds: list[dict[str, Any]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'windowlm[bench]')"
    levels = [r["concurrency"] for r in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [r["tokens_per_second"] for r in rounds], "o-", label="HTTP/SSE")
    left.plot(levels, [r["engine_tokens_per_second"] for r in rounds], "s--", label="engine alone")
    left.plot(levels, [r["decoder_tokens_per_second"] for r in rounds], "^:", label="decode step alone")
    left.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s", title="Aggregate throughput")
    left.legend()
    for key, label in (("ttft_seconds", "time to first token"), ("inter_token_seconds", "inter-token")):
        right.plot(levels, [r[key].get("p50", 0) * 1000 for r in rounds], "o-", label=f"{label} p50")
        right.plot(levels, [r[key].get("p99", 0) * 1000 for r in rounds], "x:", label=f"{label} p99")
    right.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="Latency")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return str(path)


def measure_level(port: int, model: torch.nn.Module, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """`args.repeats` HTTP rounds at one concurrency, each followed at once by the same load on the engine alone
    (the server sits idle meanwhile), so that both sides of each HTTP/engine ratio meet the same machine.

    Reports the round with the median HTTP tokens/s, the median engine figure and the median of the ratios.
    """
    http, engine = [], []
    for _ in range(args.repeats):
        http.append(asyncio.run(one_round(port, concurrency, args.max_tokens)))
        engine.append(engine_tokens_per_second(model, concurrency, args.max_tokens))
    result = sorted(http, key=lambda round_: round_["tokens_per_second"])[len(http) // 2]
    result["repeats"] = args.repeats
    result["engine_tokens_per_second"] = statistics.median(engine)
    ratios = [round_["tokens_per_second"] / alone for round_, alone in zip(http, engine, strict=True)]
    result["http_over_engine"] = statistics.median(ratios)
    decoder_alone = batched_tokens_per_second_in_turns(model, [concurrency], args.steps, rounds=1)
    result["decoder_tokens_per_second"] = decoder_alone[str(concurrency)]
    return result


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    from weights.io import load_checkpoint

    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(args.weights) if args.weights else bench_checkpoint(Path(scratch) / "bench")
        model, _ = load_checkpoint(weights, device=device, dtype=dtype)
        port = free_port()
        machine, on = machine_state(), device_state(device, dtype)
        flags = ["--device", device.type, "--dtype", args.dtype] + (["--compile"] if args.compile else [])
        # compiling the decode step takes minutes on a small CPU with a cold cache
        server = start_server(weights, port, max(args.concurrency), *flags, ready_within=900 if args.compile else 120)
        try:
            asyncio.run(one_round(port, 1, 16))  # warm up
            rounds = [measure_level(port, model, n, args) for n in args.concurrency]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)

    by_level = {r["concurrency"]: r for r in rounds}
    report: dict[str, Any] = {
        "machine": machine,
        "device": finish_device_state(on, device),  # peak memory: of this process (the engine alone, the raw decode)
        "model": str(weights) if args.weights else dict(BENCH_MODEL, use_abs_pos_emb=False),
        "max_tokens": args.max_tokens,
        "server_compiled": args.compile,  # the engine-alone and decoder figures are of the eager step
        "http_tokens_per_second": {str(n): r["tokens_per_second"] for n, r in by_level.items()},
        "rounds": rounds,
    }
    if 1 in by_level and 16 in by_level:
        report["tokens_per_second_16_over_1"] = by_level[16]["tokens_per_second"] / by_level[1]["tokens_per_second"]
    if 1 in by_level:
        report["single_stream_http_over_engine"] = by_level[1]["http_over_engine"]
    report["plot"] = plot(rounds, Path(args.plot))
    finish_machine_state(machine)
    return report


def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="checkpoint to serve (default: the decode bench's model, random weights)")
    parser.add_argument("--concurrency", type=lambda s: [int(p) for p in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens each stream asks for")
    parser.add_argument("--steps", type=int, default=64, help="timed engine steps for the raw figure")
    parser.add_argument("--repeats", type=int, default=3, help="HTTP and engine-alone rounds per concurrency")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    add_device_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="serve with --compile (the compiled decode step)")
    parser.add_argument("--plot", default="bench-serve.png", help="where to write the PNG")
