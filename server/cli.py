"""The `windowlm` command line: serve, generate, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from server.bench import add_bench_arguments
    from server.bench_serve import add_serve_bench_arguments
    from weights.convert import add_convert_arguments
    from weights.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="windowlm", description="Serve local-attention language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (flags override WINDOWLM_* variables)")
    serve.add_argument("--weights", help="checkpoint folder (default: the bundled model)")
    serve.add_argument("--model-name", help="model id in the API (default: the checkpoint folder's name)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-batch-size", type=int, help="KV cache slots: sequences decoded together")
    serve.add_argument("--max-queue", type=int, help="waiting requests before new ones get 429")
    serve.add_argument("--max-n", type=int, help="largest n (choices per request)")
    serve.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill step")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY")
    serve.add_argument("--drain-timeout", type=float, help="seconds streams may run on after SIGTERM")
    serve.add_argument("--ping-interval", type=float, help="seconds between SSE pings on an idle stream")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])

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
    from model.generate import Decoder, stream_tokens
    from model.sampling import SamplingError, SamplingParams, SequenceSampler
    from model.stopping import StopMatcher
    from model.tokenizer import ByteTokenizer, IncrementalDecoder
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

        run = run_decode_bench if args.bench == "decode" else run_serve_bench
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
