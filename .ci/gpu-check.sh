#!/usr/bin/env bash
# `make gpu-check`: the CUDA path tested and measured in one run, on a GPU host, within 10 minutes.
#
# The host is expected to have Python 3.12 with torch for CUDA, einops, safetensors, tqdm, prometheus-client,
# httpx and pytest, and no package index: everything else comes from .ci/gpu-wheels (made beforehand by
# `make gpu-wheels` on a machine that reaches one) into a virtual environment that sees the host's packages.
# Then the GPU test set (tests/gpu), `windowlm bench decode` and `windowlm bench serve` on CUDA in bfloat16
# (each step under its own timeout: 90 + 150 + 120 + 120 + 100 s, so the whole run ends within 10 minutes),
# and the compiled decode step (CUDA graphs) against the eager one;
# every result lands in one folder (the first argument, default gpu-results), with a short summary at the end.
# On a machine without CUDA the CUDA-only steps are skipped, and short CPU runs of the same benchmarks try the
# plumbing (the summary says so).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
results="${1:-gpu-results}"
mkdir -p "$results"
started=$(date +%s)
python="${GPU_CHECK_PYTHON:-python3}"  # the Makefile passes the project's .venv where there is one
step() { printf '\n== %s (%ss in)\n' "$1" "$(($(date +%s) - started))"; }

step "install"
if [ -d .ci/gpu-wheels ] && "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    packages=$("$python" .ci/gpu_packages.py)
    wheels=(--disable-pip-version-check --no-index --find-links .ci/gpu-wheels)
    if "$python" -m venv --system-site-packages .gpu-venv 2>/dev/null; then  # it sees the host's torch
        # shellcheck disable=SC2086  # one argument per package
        timeout 90 .gpu-venv/bin/python -m pip install -q "${wheels[@]}" $packages >"$results/install.log" 2>&1
        status=$?
        python=.gpu-venv/bin/python
    else  # a Python without venv: the packages go into a folder of their own on PYTHONPATH
        # shellcheck disable=SC2086
        timeout 90 "$python" -m pip install -q "${wheels[@]}" --target .gpu-site $packages >"$results/install.log" 2>&1
        status=$?
        export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    [ "$status" = 0 ] || { cat "$results/install.log"; exit 1; }
else
    echo "skipped: the wheels in .ci/gpu-wheels are for Python 3.12 (make gpu-wheels); using $python as it is"
fi
cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))') || {
    echo "$python cannot import torch: the GPU host brings torch for CUDA; here, make install first"
    exit 1
}
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

step "GPU tests"
if [ "$cuda" = 1 ]; then
    WINDOWLM_REQUIRE_GPU=1 timeout 150 "$python" -m pytest -q -p no:cacheprovider -rs tests/gpu \
        >"$results/gpu-tests.txt" 2>&1
else
    timeout 60 "$python" -m pytest -q -p no:cacheprovider -rs tests/gpu >"$results/gpu-tests.txt" 2>&1
fi
echo "pytest exit $?"
tail -n 3 "$results/gpu-tests.txt"

step "bench decode"
if [ "$cuda" = 1 ]; then
    timeout 120 "$python" -m server.cli bench decode --device cuda --dtype bfloat16 --contexts 512,8192,65536 \
        --batches 1,8,32,64,256 --quick >"$results/decode.json" 2>"$results/decode.log"
else
    echo "CUDA-only; trying the command on the CPU with small settings"
    timeout 120 "$python" -m server.cli bench decode --device cpu --dtype float32 --contexts 512,2048 \
        --batches 1,8 --quick --long-tokens 0 --no-reference --no-mistral >"$results/decode.json" 2>"$results/decode.log"
fi
echo "exit $?"

step "bench decode --compile"
if [ "$cuda" = 1 ]; then
    timeout 120 "$python" -m server.cli bench decode --device cuda --dtype bfloat16 --contexts 512,8192 \
        --batches 1,8 --quick --long-tokens 0 --compile >"$results/decode-compiled.json" 2>>"$results/decode.log"
    echo "exit $?"
else
    echo "CUDA-only (the step captured as CUDA graphs); skipped"
fi

step "bench serve"
if [ "$cuda" = 1 ]; then
    timeout 100 "$python" -m server.cli bench serve --device cuda --dtype bfloat16 --concurrency 1,4,16,64 \
        --max-tokens 128 --repeats 1 --steps 32 --plot "$results/serve.png" >"$results/serve.json" 2>"$results/serve.log"
else
    echo "CUDA-only; trying the command on the CPU with small settings"
    timeout 120 "$python" -m server.cli bench serve --device cpu --dtype float32 --concurrency 1,4 \
        --max-tokens 16 --repeats 1 --steps 8 --plot "$results/serve.png" >"$results/serve.json" 2>"$results/serve.log"
fi
echo "exit $?"

step "summary"
"$python" .ci/gpu_summary.py "$results" "$cuda" | tee "$results/summary.txt"
echo "gpu-check took $(($(date +%s) - started)) s"
