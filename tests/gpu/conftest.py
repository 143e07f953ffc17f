"""The GPU test set: the CUDA path (the cache on the device, batched decode, half precision, the engine and the
HTTP server on `--device cuda`). Every test here needs CUDA; on a machine without it they are reported as
skipped with the reason, and `make test` stays green. `make gpu-check` runs them on a GPU host with
WINDOWLM_REQUIRE_GPU=1, which turns that skip into a failure. WINDOWLM_GPU_TEST_DEVICE=cpu runs the same tests
on the CPU, to try them where no GPU is."""

from __future__ import annotations

import os

import pytest
import torch

NO_CUDA = "CUDA is not available here: the GPU test set runs on a GPU host (make gpu-check)"
# The device the set runs on: cuda, or cpu to try the tests themselves on a machine without a GPU.
DEVICE = torch.device(os.environ.get("WINDOWLM_GPU_TEST_DEVICE", "cuda"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if DEVICE.type != "cuda" or torch.cuda.is_available():
        return
    if os.environ.get("WINDOWLM_REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"WINDOWLM_REQUIRE_GPU=1 but {NO_CUDA}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
