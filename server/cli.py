"""The `windowlm` command line: serve, generate, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from server.bench import add_bench_arguments
    from server.bench_serve import add_serve_bench_arguments
    from server.bench_soak import add_soak_bench_arguments
    from server.config import add_settings_arguments
    from weights.convert import add_convert_arguments
    from weights.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="windowlm", description="Serve local-attention language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (flags override WINDOWLM_* variables)")
    add_settings_arguments(serve)

    generate = commands.add_parser("generate", help="stream a completion of a prompt to stdout")
    generate.add_argument("prompt")
    generate.add_argument(
        "--weights", default=None, help="checkpoint folder (default: WINDOWLM_WEIGHTS, else the bundled model)"
    )
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")

    add_train_arguments(commands.add_parser("train", help="train a byte-level model and write a checkpoint"))
    add_convert_arguments(
        commands.add_parser("convert", help="turn a local-attention state dict into a windowlm checkpoint")
    )

    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    add_bench_arguments(bench_kinds.add_parser("decode", help="decode speed and memory of the sliding cache"))
    add_serve_bench_arguments(bench_kinds.add_parser("serve", help="the HTTP path under concurrent streams"))
    add_soak_bench_arguments(bench_kinds.add_parser("soak", help="a bounded load of careless and hostile clients"))
    return parser


def weights_folder(given: str | None) -> Path:
    """--weights, else WINDOWLM_WEIGHTS, else the bundled model: the same default as `windowlm serve`."""
    from server.config import Settings

    folder = Settings().weights if given is None else Path(given)
    if not (folder / "config.json").is_file():
        what = "the bundled model" if given is None else "--weights"
        raise SystemExit(f"windowlm: {what} at {folder} is not a checkpoint folder (no config.json)")
    return folder


def run_generate(args: argparse.Namespace) -> int:
    from model.decoder import Decoder
    from model.generate import stream_tokens
    from model.sampling import SamplingError, SamplingParams, SequenceSampler
    from model.tokenizer import ByteTokenizer, IncrementalDecoder
    from server.stop_matcher import StopMatcher
    from weights.io import CheckpointError, load_checkpoint

    try:
        model, _ = load_checkpoint(weights_folder(args.weights))
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        sampler = SequenceSampler(params, model.num_tokens)
        stop = StopMatcher(args.stop)
    except (CheckpointError, SamplingError, ValueError) as error:
        print(f"windowlm generate: {error}", file=sys.stderr)
        return 2
    if args.max_tokens < 1:
        print("windowlm generate: --max-tokens must be at least 1", file=sys.stderr)
        return 2

    prompt = ByteTokenizer().encode(args.prompt)
    text = IncrementalDecoder()
    out = sys.stdout
    for token in stream_tokens(Decoder(model, num_slots=1), 0, prompt, sampler, args.max_tokens):
        piece, stopped = stop.push(text.push(token))
        out.write(piece)
        out.flush()
        if stopped:
            break
    else:
        out.write(stop.push(text.flush())[0] + stop.flush())
    out.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from server.bench import run_decode_bench
        from server.bench_serve import run_serve_bench
        from server.bench_soak import run_soak_bench

        run = {"decode": run_decode_bench, "serve": run_serve_bench, "soak": run_soak_bench}[args.bench]
        print(json.dumps(run(args), indent=2))
        return 0
    if args.command == "generate":
        return run_generate(args)
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
