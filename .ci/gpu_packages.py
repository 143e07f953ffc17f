"""The packages `make gpu-check` installs from .ci/gpu-wheels: windowlm's runtime dependencies (torch aside:
the GPU host brings its own CUDA build) and the dev packages the GPU test set imports. Read from pyproject.toml,
so the lists never drift; printed one per line. With --no-deps-only, the ones whose wheels are fetched without
their dependencies (they would pull in a torch build); with --with-deps-only, the others."""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

# dev packages tests/gpu imports (tests/conftest.py, the reference helpers of tests/model, the openai client)
TEST_PACKAGES = ("pytest", "hypothesis", "openai", "local-attention", "hyper-connections", "torch-einops-utils")
NEEDS_TORCH = ("local-attention", "hyper-connections", "torch-einops-utils")


def name_of(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()


def packages(no_deps_only: bool = False, with_deps_only: bool = False) -> list[str]:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    runtime = [spec for spec in project["dependencies"] if name_of(spec) != "torch"]
    tests = [spec for spec in project["optional-dependencies"]["dev"] if name_of(spec) in TEST_PACKAGES]
    chosen = [*runtime, *tests]
    if no_deps_only or with_deps_only:
        return [spec for spec in chosen if (name_of(spec) in NEEDS_TORCH) == no_deps_only]
    return chosen


if __name__ == "__main__":
    print("\n".join(packages("--no-deps-only" in sys.argv, "--with-deps-only" in sys.argv)))
