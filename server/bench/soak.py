"""`windowlm bench soak`: does the server survive a bounded load of careless and hostile clients? As JSON.

It starts `windowlm serve` on a loopback port and runs `--load` x `--max-batch-size` clients for `--duration`
seconds (streams in flight at the deadline run to their end). Each client loops over streaming completions with a
random prompt, length, seed and temperature, now and then n > 1 or logprobs. Some requests drop the connection
after a few chunks. Some read the response head and then nothing for 5-30 s, on a raw socket with a small receive
buffer, so that what the server writes piles up on its side (in the kernel's send buffer first: on Linux up to
tcp_wmem's 4 MiB, more than a 256-token stream fills, before the server's own writes block). The rest read to
[DONE] and check that the tokens received add up to the usage reported. A 429 is expected above load 1: the
client backs off briefly and sends the request again. Meanwhile the server's RSS is sampled every second. When
the load stops, the slot and queue gauges of /metrics are read once the server has settled (10 s at most), and the
server is stopped with SIGTERM; its exit status is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.bench.http import Received, http_request, parse_head, sse_data
from server.bench.machine import finish_machine_state, machine_state
from server.bench.probe import log_tail, rss_mb, sample_rss, settled_gauges, stop_server
from server.bench.serve import MODEL_ID, free_port, start_server

PROMPTS = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows"
REQUEST_TIMEOUT = 300.0  # seconds one request may take, queueing included, before the client gives up
SMALL_RECEIVE_BUFFER = 4096  # bytes (Linux doubles it): a non-reading client's side holds next to nothing
GOLDEN_RATIO = (5**0.5 - 1) / 2


@dataclass
class Tally:
    """Everything the clients saw."""

    status_counts: Counter = field(default_factory=Counter)
    completed_streams: int = 0
    disconnected_streams: int = 0
    nonreading_streams: int = 0
    error_events: int = 0
    completion_tokens: int = 0
    token_checks: Counter = field(default_factory=Counter)  # "exact" (no U+FFFD or logprobs) or "bounded"
    token_mismatches: int = 0
    protocol_errors: Counter = field(default_factory=Counter)
    client_errors: Counter = field(default_factory=Counter)


def request_body(rng: random.Random, max_sequences: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "prompt": PROMPTS[rng.randrange(len(PROMPTS) // 2) :][: rng.randint(1, 48)],  # a short random piece
        "max_tokens": rng.randint(16, 256),
        "seed": rng.randrange(2**31),
        "temperature": round(rng.uniform(0.0, 1.5), 2),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if rng.random() < 0.25:
        body["n"] = min(rng.randint(2, 4), max_sequences)
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    return body


class Soak:
    """The clients of one soak against the server on `port`, and what they saw."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port = port
        self.args = args
        self.max_sequences = args.max_batch_size + args.max_queue
        self.tally = Tally()
        self.deadline = 0.0
        self.requests_begun = 0
        self.kind_offset = random.Random(args.seed).random()

    async def run(self, clients: int) -> None:
        self.deadline = time.monotonic() + self.args.duration
        await asyncio.gather(*(self.client(random.Random(self.args.seed * 1_000_003 + i)) for i in range(clients)))

    def next_kind(self) -> str:
        """The kind of the next request. Kinds come in their shares spread evenly over any stretch of requests
        (the golden-ratio sequence), not by independent draws: a short soak meets every kind whatever the timing."""
        self.requests_begun += 1
        spot = (self.kind_offset + self.requests_begun * GOLDEN_RATIO) % 1.0
        if spot < self.args.nonreading_share:
            return "nonreading"
        return "disconnecting" if spot < self.args.nonreading_share + self.args.disconnect_share else "reading"

    async def client(self, rng: random.Random) -> None:
        """Request after request until the deadline; a request answered 429 is sent again after a short pause."""
        while time.monotonic() < self.deadline:
            kind, body = self.next_kind(), request_body(rng, self.max_sequences)
            drop_after, pause = rng.randint(0, 64), rng.uniform(5, 30)
            status = 429
            while status == 429 and time.monotonic() < self.deadline:
                if kind == "nonreading":
                    status = await self.attempt(self.nonreading(body, pause))
                else:
                    status = await self.attempt(self.reading(body, drop_after if kind == "disconnecting" else None))
                if status != 200:
                    await asyncio.sleep(rng.uniform(0.05, 0.5))

    async def attempt(self, request: Coroutine[Any, Any, int]) -> int | None:
        """The status of one HTTP request, or None when it failed on the client's side (counted by kind)."""
        try:
            return await asyncio.wait_for(request, REQUEST_TIMEOUT)
        except (OSError, EOFError, ValueError, asyncio.TimeoutError) as error:  # IncompleteReadError: an EOFError
            self.tally.client_errors[type(error).__name__] += 1
            return None

    async def reading(self, body: dict[str, Any], drop_after: int | None) -> int:
        """One stream read to [DONE], or dropped after `drop_after` data events."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(http_request(self.port, body))
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            self.tally.status_counts[status] += 1
            if status != 200:
                return status
            if drop_after == 0:  # gone before the first token: the request may still be queued
                self.tally.disconnected_streams += 1
                return status
            received, events = Received(), 0
            async for data in sse_data(reader, headers):
                if data == "[DONE]":
                    self.check(body, received)
                    return status
                payload = json.loads(data)
                received.add(payload)
                self.tally.error_events += "error" in payload
                events += 1
                if drop_after is not None and events >= drop_after:
                    self.tally.disconnected_streams += 1
                    return status
            self.tally.protocol_errors["stream ended without [DONE]"] += 1
            return status
        finally:
            writer.close()

    def check(self, body: dict[str, Any], received: Received) -> None:
        """A stream that reached [DONE] without an error event: every choice finished, and the tokens received
        match the usage."""
        if received.error:
            return
        self.tally.completed_streams += 1
        if received.finished != set(range(body.get("n", 1))):
            self.tally.protocol_errors["a choice without finish_reason"] += 1
        if received.usage is None:
            self.tally.protocol_errors["no usage chunk"] += 1
            return
        self.tally.completion_tokens += received.usage
        fewest, most = received.token_bounds("logprobs" in body)
        self.tally.token_checks["exact" if fewest == most else "bounded"] += 1
        self.tally.token_mismatches += not fewest <= received.usage <= most

    async def nonreading(self, body: dict[str, Any], seconds: float) -> int:
        """Send a request, read only the response head, then read nothing for `seconds` and close."""
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)  # before connect: the window
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            await loop.sock_sendall(sock, http_request(self.port, body))
            head = b""
            while b"\r\n\r\n" not in head:
                if not (data := await loop.sock_recv(sock, 256)):
                    raise EOFError("the server closed the connection before its response head")
                head += data
            status, _ = parse_head(head.split(b"\r\n\r\n")[0])
            self.tally.status_counts[status] += 1
            if status == 200:
                await asyncio.sleep(seconds)
                self.tally.nonreading_streams += 1
            return status


async def warm_up(port: int, args: argparse.Namespace, streams: int) -> None:
    """One round of short streams read to the end, so that the RSS at the start is after warm-up."""
    bodies = [dict(request_body(random.Random(i), 1), max_tokens=32) for i in range(streams)]
    await asyncio.gather(*(Soak(port, args).reading(body, None) for body in bodies))


async def soak(port: int, pid: int, args: argparse.Namespace, clients: int) -> tuple[Tally, list[float], float]:
    """The load, with the server's RSS sampled every second from its start; returns the tally, the samples and
    the seconds the load took (the duration, plus the streams in flight at the deadline running to their end)."""
    samples: list[float] = []
    sampler = asyncio.ensure_future(sample_rss(pid, samples))
    started = time.monotonic()
    load = Soak(port, args)
    try:
        await load.run(clients)
    finally:
        sampler.cancel()
    return load.tally, samples, time.monotonic() - started


def soak_server(weights: Path, args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """Start the server, warm it up, run the load, read its settled gauges and RSS, stop it: the raw results."""
    port = free_port()
    flags = ("--host", "127.0.0.1", "--max-queue", str(args.max_queue), "--max-n", "4")
    with tempfile.TemporaryFile("w+") as log:
        try:
            server = start_server(weights, port, args.max_batch_size, *flags, log=log)
        except RuntimeError as error:
            raise SystemExit("windowlm bench soak: " + "\n".join([str(error), *log_tail(log)])) from error
        try:
            asyncio.run(warm_up(port, args, min(clients, args.max_batch_size)))
            tally, samples, elapsed = asyncio.run(soak(port, server.pid, args, clients))
            gauges_at_end = settled_gauges(port)
            rss_end = rss_mb(server.pid)
            samples += [] if rss_end is None else [rss_end]
        finally:
            exit_code = stop_server(server)
        return {
            "elapsed_seconds": round(elapsed, 1),
            **summary(tally),
            "rss_mb": {"start": samples[0] if samples else None, "end": rss_end, "max": max(samples, default=None)},
            "slots_in_use_at_end": gauges_at_end.get("windowlm_kv_slots_used"),
            "requests_waiting_at_end": gauges_at_end.get("windowlm_requests_waiting"),
            "server_exit_code": exit_code,
            "server_log_tail": log_tail(log),
        }


def run_soak_bench(args: argparse.Namespace) -> dict[str, Any]:
    from server.config import weights_folder

    weights = weights_folder(args.weights)
    clients = max(1, round(args.load * args.max_batch_size))
    machine = machine_state()
    results = soak_server(weights, args, clients)
    settings = ("duration", "load", "max_batch_size", "max_queue", "disconnect_share", "nonreading_share", "seed")
    report = {
        "settings": {"weights": weights.name, "clients": clients, **{name: getattr(args, name) for name in settings}},
        "machine": finish_machine_state(machine),
        **results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(tally: Tally) -> dict[str, Any]:
    statuses = tally.status_counts
    return {
        "requests": sum(statuses.values()),
        "status_counts": {str(status): count for status, count in sorted(statuses.items())},
        "server_5xx": sum(count for status, count in statuses.items() if status >= 500),
        "error_events": tally.error_events,
        "rejected_429": statuses[429],
        "completed_streams": tally.completed_streams,
        "disconnected_streams": tally.disconnected_streams,
        "nonreading_streams": tally.nonreading_streams,
        "completion_tokens": tally.completion_tokens,
        "token_mismatches": tally.token_mismatches,
        "token_checks": dict(tally.token_checks),
        "protocol_errors": dict(tally.protocol_errors),
        "client_errors": dict(tally.client_errors),
    }


def add_soak_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="checkpoint to serve (default: the bundled model, as `windowlm serve`)")
    parser.add_argument("--duration", type=float, default=900.0, help="seconds of load")
    parser.add_argument("--load", type=float, default=2.0, help="concurrent clients per KV slot")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's KV slots (its capacity)")
    parser.add_argument("--max-queue", type=int, default=16, help="the server's queue places")
    parser.add_argument("--disconnect-share", type=float, default=0.2, help="requests dropped after a few chunks")
    parser.add_argument("--nonreading-share", type=float, default=0.05, help="requests left unread for 5-30 s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    parser.add_argument("--out", help="also write the JSON to this file")
