"""The `windowlm` command line."""

from __future__ import annotations

import argparse
import json
import sys

from server.bench import add_bench_arguments, run_decode_bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windowlm", description="Serve local-attention language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--weights", default=None, help="checkpoint folder (default: the bundled model)")

    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    decode = bench_kinds.add_parser("decode", help="decode speed and memory of the sliding cache")
    add_bench_arguments(decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        print(json.dumps(run_decode_bench(args), indent=2))
        return 0
    if args.command == "serve":
        print("windowlm serve: the HTTP server is not built yet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
