"""The `windowlm` command line: serve, generate, chat, train, convert, bench."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from server.bench.arrivals import add_arrivals_bench_arguments
    from server.bench.chat import add_chat_bench_arguments
    from server.bench.constrained import add_constrained_bench_arguments
    from server.bench.decode import add_decode_bench_arguments
    from server.bench.prompt import add_prompt_bench_arguments
    from server.bench.serve import add_serve_bench_arguments
    from server.bench.soak import add_soak_bench_arguments
    from server.bench.threads import add_threads_bench_arguments
    from server.chat_command import add_chat_arguments
    from server.config import add_settings_arguments
    from server.generate_command import add_generate_arguments
    from weights.convert import add_convert_arguments
    from weights.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="windowlm", description="Serve local-attention language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (flags override WINDOWLM_* variables)")
    add_settings_arguments(serve)

    add_generate_arguments(commands.add_parser("generate", help="stream a completion of a prompt to stdout"))
    add_chat_arguments(
        commands.add_parser("chat", help="a conversation in the terminal, with a server or a checkpoint")
    )

    add_train_arguments(commands.add_parser("train", help="train a byte-level model and write a checkpoint"))
    add_convert_arguments(
        commands.add_parser("convert", help="turn a local-attention state dict into a windowlm checkpoint")
    )

    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    add_decode_bench_arguments(bench_kinds.add_parser("decode", help="decode speed and memory of the sliding cache"))
    add_serve_bench_arguments(bench_kinds.add_parser("serve", help="the HTTP path under concurrent streams"))
    add_soak_bench_arguments(bench_kinds.add_parser("soak", help="a bounded load of careless and hostile clients"))
    add_chat_bench_arguments(bench_kinds.add_parser("chat", help="per-token latency of chat against completions"))
    add_prompt_bench_arguments(bench_kinds.add_parser("prompt", help="time to first token against prompt length"))
    add_arrivals_bench_arguments(bench_kinds.add_parser("arrivals", help="what simultaneous prompts cost"))
    add_threads_bench_arguments(bench_kinds.add_parser("threads", help="decode speed against thread settings"))
    add_constrained_bench_arguments(
        bench_kinds.add_parser("constrained", help="decode speed under a JSON schema, and compile times")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from server.bench.arrivals import run_arrivals_bench
        from server.bench.chat import run_chat_bench
        from server.bench.constrained import run_constrained_bench
        from server.bench.decode import run_decode_bench
        from server.bench.prompt import run_prompt_bench
        from server.bench.serve import run_serve_bench
        from server.bench.soak import run_soak_bench
        from server.bench.threads import run_threads_bench

        benches = {"decode": run_decode_bench, "serve": run_serve_bench, "soak": run_soak_bench}
        benches.update(chat=run_chat_bench, prompt=run_prompt_bench, arrivals=run_arrivals_bench)
        benches.update(threads=run_threads_bench, constrained=run_constrained_bench)
        run = benches[args.bench]
        print(json.dumps(run(args), indent=2))
        return 0
    if args.command == "generate":
        from server.generate_command import run_generate

        return run_generate(args)
    if args.command == "chat":
        from server.chat_command import run_chat

        return run_chat(args)
    if args.command == "train":
        from weights.train import run_train

        return run_train(args)
    if args.command == "convert":
        from weights.convert import run_convert

        return run_convert(args)
    if args.command == "serve":
        from server.serve import run_serve

        return run_serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
