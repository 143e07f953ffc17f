#!/bin/sh
# Where `make` installs torch from (see the Makefile): prints the pip arguments that choose the source, nothing
# for pip's configured sources, and says why on stderr. Usage: sh .ci/torch-source.sh PYTHON SPEC
#
#   TORCH_INDEX_URL set                    that index
#   an NVIDIA driver (nvidia-smi)          pip's configured sources: torch's default Linux build is the CUDA one
#   pip's sources resolve a CPU build      pip's configured sources (a local wheel file, or a +cpu build)
#   TORCH_CPU_INDEX_URL answers in time    that index (PyTorch's CPU wheel index, by default)
#   otherwise                              pip's configured sources, which may bring the CUDA build
#
# Every probe is bounded in time: pip's dry run gets one try with a 10 s timeout, the index PROBE_SECONDS.
set -eu
python=$1
spec=$2
probe_seconds=${PROBE_SECONDS:-5}

say() { echo "torch ($spec): $*" >&2; }

if [ -n "${TORCH_INDEX_URL:-}" ]; then
    say "from TORCH_INDEX_URL"
    echo "--index-url $TORCH_INDEX_URL"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    say "NVIDIA driver found: the default (CUDA) build from pip's configured sources"
    exit 0
fi

# The wheel pip would take: its URL in pip's installation report (a percent-encoded "+" in a file name is %2B).
resolved=$("$python" -m pip install --disable-pip-version-check --dry-run --quiet --ignore-installed --no-deps \
    --retries 0 --timeout 10 --report - "$spec" 2>/dev/null | grep '"url"' || true)
case $resolved in
*'"file:'* | *+cpu* | *%2Bcpu* | *%2bcpu*)
    say "a CPU build from pip's configured sources"
    exit 0
    ;;
esac

if [ -n "${TORCH_CPU_INDEX_URL:-}" ] && "$python" - "$TORCH_CPU_INDEX_URL/torch/" "$probe_seconds" <<'EOF'; then
import sys, threading, urllib.request

answered = []

def probe() -> None:  # in a thread: urlopen's timeout does not bound the name lookup
    try:
        with urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=float(sys.argv[2])):
            answered.append(True)
    except Exception:
        pass

thread = threading.Thread(target=probe, daemon=True)
thread.start()
thread.join(float(sys.argv[2]))
sys.exit(0 if answered else 1)
EOF
    say "the CPU build from PyTorch's CPU wheel index"
    echo "--index-url $TORCH_CPU_INDEX_URL"
    exit 0
fi
say "no CPU build found and PyTorch's CPU wheel index did not answer: pip's configured sources"
