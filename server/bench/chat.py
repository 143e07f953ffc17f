"""`windowlm bench chat`: what the chat API costs over completions, as JSON.

The same text is generated both ways: a conversation through /v1/chat/completions, and the prompt its chat
template renders through /v1/completions, greedy and with `ignore_eos` so both run the full `max_tokens`. The
two endpoints are measured in turns, one stream at a time, so a change of the machine's speed during the run
falls on both alike; the figure is the ratio of their per-token latencies (first to last token).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
from pathlib import Path
from typing import Any

from model.chat_template import ChatTemplate
from server.bench.machine import finish_machine_state, machine_state
from server.bench.serve import MODEL_ID, free_port, one_stream, start_server
from server.chat_templates import server_chat_template
from server.config import BUNDLED_WEIGHTS, Settings

CONVERSATION = [
    {"role": "system", "content": "A hall in the castle."},
    {"role": "user", "content": "What says the messenger? Speak plainly, and be brief."},
]


def bodies(template: ChatTemplate, max_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(chat body, completions body) that generate the same tokens."""
    common = {"model": MODEL_ID, "temperature": 0, "ignore_eos": True, "stream": True}
    common["stream_options"] = {"include_usage": True}
    chat = {**common, "messages": CONVERSATION, "max_tokens": max_tokens}
    prompt = template.render(CONVERSATION, add_generation_prompt=True)
    return chat, {**common, "prompt": prompt, "max_tokens": max_tokens}


def per_token_seconds(result: dict[str, Any]) -> float:
    return (result["last"] - result["first"]) / (result["tokens"] - 1)


def run_chat_bench(args: argparse.Namespace) -> dict[str, Any]:
    weights = Path(args.weights)
    template = server_chat_template(Settings(weights=weights), weights)
    chat, completion = bodies(template, args.max_tokens)
    port = free_port()
    machine = machine_state()
    server = start_server(weights, port, 4)
    samples: dict[str, list[float]] = {"chat": [], "completions": []}
    tokens: dict[str, int] = {}
    try:
        for _ in range(2):  # warm up both paths
            asyncio.run(one_stream(port, chat, "/v1/chat/completions"))
            asyncio.run(one_stream(port, completion))
        for _ in range(args.repeats):
            for name, body, path in (
                ("chat", chat, "/v1/chat/completions"),
                ("completions", completion, "/v1/completions"),
            ):
                result = asyncio.run(one_stream(port, body, path))
                samples[name].append(per_token_seconds(result))
                tokens[name] = result["tokens"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    report = {
        "machine": machine,
        "weights": str(weights),
        "max_tokens": args.max_tokens,
        "tokens": tokens,
        "repeats": args.repeats,
        "per_token_seconds_median": medians,
        "per_token_seconds": samples,
        "chat_over_completions": medians["chat"] / medians["completions"],
    }
    finish_machine_state(machine)
    return report


def add_chat_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help="checkpoint to serve (default: bundled)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens each stream generates")
    parser.add_argument("--repeats", type=int, default=10, help="streams per endpoint, in turns")
