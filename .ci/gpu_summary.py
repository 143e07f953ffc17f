"""The closing summary of `make gpu-check`: test counts and the figures the GPU issue asks for, from the results
folder. Usage: python .ci/gpu_summary.py RESULTS CUDA (CUDA is 1 when the run had a GPU)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"unreadable": f"{path.name}: {error}"}


def figure(data: dict, *keys: str) -> object:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return "-"
        data = data[key]
    return round(data, 3) if isinstance(data, float) else data


def main(results: Path, cuda: bool) -> None:
    tests = (results / "gpu-tests.txt").read_text() if (results / "gpu-tests.txt").exists() else ""
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", tests)
    print("where:", "a GPU" if cuda else "no CUDA here: the CUDA-only steps were skipped, the benchmarks tried on CPU")
    print("GPU tests:", ", ".join(f"{n} {what}" for n, what in counts) or "no result")
    decode, serve = report(results / "decode.json"), report(results / "serve.json")
    device = decode.get("device", {})
    print("device:", device.get("name", device.get("type", "-")), device.get("dtype", ""))
    largest = max((int(batch) for batch in decode.get("batched_tokens_per_second", {})), default=None)
    print("decode tokens/s at batch 1:", figure(decode, "batched_tokens_per_second", "1"))
    if largest is not None and largest != 1:
        print(f"decode tokens/s at batch {largest}:", figure(decode, "batched_tokens_per_second", str(largest)))
    contexts = sorted(int(context) for context in decode.get("decode_ms_per_token", {}))
    for context in contexts:
        print(f"ms per token at context {context}:", figure(decode, "decode_ms_per_token", str(context)))
    print("largest over smallest context (1.0 = flat):", figure(decode, "context_ratio_largest_to_smallest"))
    print("peak GPU memory MiB:", figure(decode, "device", "peak_memory_allocated_mib"))
    compiled = report(results / "decode-compiled.json")
    for batch in ("1", "8"):
        print(
            f"compiled over eager at batch {batch}:",
            figure(compiled, "compiled_decode", "batched_tokens_per_second", "compiled_over_eager", batch),
        )
    print("compile (capture) seconds:", figure(compiled, "compiled_decode", "startup_seconds"))
    for streams, value in serve.get("http_tokens_per_second", {}).items():
        print(f"HTTP tokens/s at {streams} streams:", round(value, 1) if isinstance(value, float) else value)
    for name, data in (("decode", decode), ("serve", serve)):
        if "unreadable" in data:
            print(f"{name}: {data['unreadable']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "1")
