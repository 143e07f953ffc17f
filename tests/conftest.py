import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Hypothesis profiles. "ci" is the default, so `make test` and CI runs are reproducible: the examples come from a
# hash of each test (derandomize, which also turns off the example database), more of them than Hypothesis's
# default 100 for the property tests that leave max_examples to the profile (the stop matcher, the sampling
# reference), and no per-example deadline (the 2-core machine is often loaded). A failure prints the blob that
# replays it. "dev" explores new random examples on every run and remembers failures in .hypothesis/:
#     HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest tests/server/test_stop_matcher.py
# (pytest's --hypothesis-profile=dev does the same). A test's own @settings(max_examples=...) wins over both.
settings.register_profile("ci", derandomize=True, max_examples=300, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors: with two, each small softmax waits on the thread pool
    (about 8 ms on a loaded 2-core machine, against microseconds on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
