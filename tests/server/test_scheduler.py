"""The scheduler's decisions in process, without a model: admission, the queue limit, cancellation, prompt
progress, pausing for slow readers and every finish. This module imports no torch (see the last test)."""

from __future__ import annotations

import os
import subprocess
import sys

if os.environ.get("WINDOWLM_FORBID_TORCH"):
    sys.modules["torch"] = None  # type: ignore[assignment]  # importing torch now fails

import pytest

from server.engine_request import EngineRequest
from server.scheduler import (
    DecodeRow,
    EngineOverloaded,
    Finish,
    PromptChunk,
    SampledToken,
    Scheduler,
    StepOutput,
    tokens_that_fit,
)

CHUNK = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunk_end(start: int, end: int) -> int:
    return min(end, (start // CHUNK + 1) * CHUNK)


def scheduler(num_slots: int = 2, max_queue: int = 2, **options) -> Scheduler:
    return Scheduler(num_slots, max_queue, chunk_end=chunk_end, clock=options.pop("clock", Clock()), **options)


def request(prompt_length: int = 3, max_tokens: int = 5, tag: int = 0) -> EngineRequest:
    return EngineRequest(list(range(1, prompt_length + 1)), None, max_tokens, None, None, tag=tag, arrived_at=0.0)


def admit_all(s: Scheduler) -> list[int]:
    return [s.admit(r) for r in s.take_waiting()]


def run_step(s: Scheduler, token: int = 7) -> tuple[list[PromptChunk], list[DecodeRow]]:
    """Plan a step and report it carried out: every chunk read, every slot due a token samples `token`."""
    plan = s.plan()
    due = [c.slot for c in plan.prompt_chunks if c.samples] + [row.slot for row in plan.decode_rows]
    output = StepOutput(read=list(plan.prompt_chunks), sampled=[SampledToken(i, token, -0.5, []) for i in due])
    if plan.decode_rows:
        output.decode_seconds = 0.01
    s.record(plan, output)
    return plan.prompt_chunks, plan.decode_rows


def finishes(s: Scheduler) -> list[tuple[int, str]]:
    return [(f.request.tag, f.reason) for f in s.take_stats().finishes]


def test_tokens_that_fit_the_context() -> None:
    assert tokens_that_fit(6, 8) == 3  # the worked example of its docstring
    assert tokens_that_fit(8, 8) == 1
    assert tokens_that_fit(9, 8) == 0
    assert tokens_that_fit(10**9, None) is None


def test_requests_take_slots_in_arrival_order_lowest_slot_first() -> None:
    s = scheduler(num_slots=2, max_queue=3)
    requests = [request(tag=i) for i in range(4)]
    s.add(requests)
    assert [(s.admit(r), r.tag) for r in s.take_waiting()] == [(0, 0), (1, 1)]
    assert list(s.waiting) == requests[2:]
    s.finish(1, "error", "boom")
    assert [(s.admit(r), r.tag) for r in s.take_waiting()] == [(1, 2)]
    assert list(s.waiting) == requests[3:]


def test_the_queue_limit_counts_the_running_slots() -> None:
    """Catches an admission check that forgets the running slots: 2 running + 1 waiting fill 2 slots + 1 place."""
    s = scheduler(num_slots=2, max_queue=1)
    s.add([request(), request()])
    admit_all(s)
    s.add([request()])  # the one queue place
    with pytest.raises(EngineOverloaded, match="2 of 2 slots busy and 1 waiting"):
        s.add([request()])
    assert len(s.waiting) == 1


def test_requests_are_added_all_or_none() -> None:
    s = scheduler(num_slots=1, max_queue=1)
    with pytest.raises(EngineOverloaded):
        s.add([request(), request(), request()])
    assert not s.waiting
    s.add([request(), request()])
    assert len(s.waiting) == 2


def test_a_prompt_longer_than_the_context_is_refused() -> None:
    s = scheduler(context_limit=8)
    with pytest.raises(ValueError, match="does not fit"):
        s.add([request(prompt_length=9)])
    s.add([request(prompt_length=8)])


def test_max_tokens_zero_reads_the_prompt_and_ends_with_length() -> None:
    """Pure scoring: the prompt is read a chunk per step, nothing is sampled, and the request ends with "length"
    once its last chunk is read; no generated token, no first-token time. It needs no position for a token, so a
    prompt that fills the whole context is taken."""
    clock = Clock()
    s = scheduler(num_slots=2, context_limit=8, clock=clock)
    scoring, other = request(prompt_length=8, max_tokens=0, tag=0), request(prompt_length=2, max_tokens=2, tag=1)
    s.add([scoring, other])
    admit_all(s)
    assert s.slots[0].max_tokens == 0
    chunks, _ = run_step(s)
    shown = [(c.start, c.end, c.completes_prompt, c.samples) for c in chunks]
    assert shown == [(0, 4, False, False), (0, 2, True, True)]
    clock.now = 1.0
    chunks, rows = run_step(s)
    assert [(c.start, c.end, c.completes_prompt, c.samples) for c in chunks] == [(4, 8, True, False)]
    assert [row.request for row in rows] == [other]
    stats = s.take_stats()
    assert [(f.request.tag, f.reason) for f in stats.finishes] == [(0, "length"), (1, "length")]
    assert stats.generated_tokens == 2 and stats.prompt_tokens == 10  # the other request's tokens only
    assert stats.first_token_seconds == [0.0]  # the other request's: the scoring one has none
    assert scoring.generated == 0 and scoring.first_token_at is None and s.slots == [None, None]


def test_a_negative_max_tokens_or_prompt_logprobs_is_refused() -> None:
    s = scheduler()
    with pytest.raises(ValueError, match="max_tokens must be at least 0"):
        s.add([request(max_tokens=0), request(max_tokens=-1)])
    scoring = request()
    scoring.prompt_logprobs = -1
    with pytest.raises(ValueError, match="prompt_logprobs must be None or at least 0"):
        s.add([scoring])
    assert not s.waiting


def test_a_request_cancelled_while_queued_never_takes_a_slot() -> None:
    s = scheduler(num_slots=1, max_queue=2)
    first, second = request(tag=0), request(tag=1)
    s.add([first, second])
    first.cancelled = True
    assert [(s.admit(r), r.tag) for r in s.take_waiting()] == [(0, 1)]
    stats = s.take_stats()
    assert stats.finishes == [Finish(first, "cancelled", started=False)] and first.finished
    assert len(stats.queue_seconds) == 1  # only the started request waited in the queue


def test_a_cancelled_waiting_request_frees_its_queue_place_at_the_next_step() -> None:
    s = scheduler(num_slots=1, max_queue=1)
    running, waiting = request(tag=0), request(tag=1)
    s.add([running, waiting])
    admit_all(s)
    waiting.cancelled = True
    assert s.take_waiting() == [] and not s.waiting
    assert finishes(s) == [(1, "cancelled")]
    s.add([request(tag=2)])  # the place is free again


def test_cancelled_and_stopped_running_requests_free_their_slots() -> None:
    s = scheduler(num_slots=2)
    cancelled, stopped = request(tag=0), request(tag=1)
    s.add([cancelled, stopped])
    admit_all(s)
    cancelled.cancelled = True
    stopped.stop_sequence_reached = True
    s.release()
    assert s.slots == [None, None] and not s.busy
    assert finishes(s) == [(0, "cancelled"), (1, "stop")]


def test_a_prompt_is_read_one_chunk_per_step_then_decoded_a_token_per_step() -> None:
    s = scheduler(num_slots=1)
    r = request(prompt_length=10, max_tokens=3)
    s.add([r])
    admit_all(s)
    chunks = [run_step(s)[0] for _ in range(3)]
    assert [(c.start, c.end, c.completes_prompt) for [c] in chunks] == [(0, 4, False), (4, 8, False), (8, 10, True)]
    assert chunks[0][0].tokens == [1, 2, 3, 4]
    assert r.generated == 1  # the last chunk sampled the first token
    assert run_step(s, token=9) == ([], [DecodeRow(0, r, 7)])  # the token sampled last step is fed now
    assert run_step(s)[1] == [DecodeRow(0, r, 9)]
    assert r.generated == 3 and finishes(s) == [(0, "length")]
    assert s.slots == [None]


def test_prompts_share_a_step_within_the_prompt_token_budget_earliest_admitted_first() -> None:
    """Budget 6, chunk 4: a step reads chunks while their tokens fit, earliest admitted first; the first always
    does, and a step stops at the first that does not fit (no later, smaller one jumps the queue)."""
    clock = Clock()
    s = scheduler(num_slots=3, max_queue=0, prompt_tokens_per_step=6, clock=clock)
    late = request(prompt_length=9, tag=0)
    s.add([late])
    admit_all(s)  # slot 0, admitted at 0
    s.slots[0].request.started_at = 5.0  # as if admitted after the two below
    first, second = request(prompt_length=2, tag=1), request(prompt_length=6, tag=2)
    s.add([first, second])
    admit_all(s)  # slots 1 and 2, admitted at 0
    chunks, _ = run_step(s)
    assert [(c.request.tag, c.start, c.end) for c in chunks] == [(1, 0, 2), (2, 0, 4)]  # 2 + 4; late's 4 waits
    chunks, _ = run_step(s)
    assert [(c.request.tag, c.start, c.end) for c in chunks] == [(2, 4, 6), (0, 0, 4)]  # 2 + 4
    chunks, _ = run_step(s)
    assert [(c.request.tag, c.start, c.end) for c in chunks] == [(0, 4, 8)]
    big = scheduler(num_slots=2, prompt_tokens_per_step=1)
    big.add([request(prompt_length=9, tag=0), request(prompt_length=9, tag=1)])
    admit_all(big)
    assert [(c.request.tag, c.end) for c in run_step(big)[0]] == [(0, 4)]  # over the budget, alone
    unbounded = scheduler(num_slots=2)
    unbounded.add([request(prompt_length=9, tag=0), request(prompt_length=9, tag=1)])
    admit_all(unbounded)
    assert len(run_step(unbounded)[0]) == 2


def test_generation_ends_at_the_exact_context_limit() -> None:
    """A prompt of 6 in a context of 8: tokens fed at 6 and 7, so 3 tokens, then "length" (max_tokens 100)."""
    s = scheduler(num_slots=1, context_limit=8)
    r = request(prompt_length=6, max_tokens=100)
    s.add([r])
    admit_all(s)
    while s.busy:
        run_step(s)
    assert r.generated == 3
    assert [f.reason for f in s.take_stats().finishes] == ["length"]


def test_a_failed_row_ends_alone_with_its_message() -> None:
    s = scheduler(num_slots=2)
    a, b = request(prompt_length=2, tag=0), request(prompt_length=2, tag=1)
    s.add([a, b])
    admit_all(s)
    plan = s.plan()
    s.record(plan, StepOutput(read=plan.prompt_chunks, sampled=[SampledToken(1, 5, 0.0, [])], errors={0: "bad"}))
    stats = s.take_stats()
    assert [(f.request.tag, f.reason, f.message) for f in stats.finishes] == [(0, "error", "bad")]
    assert s.slots[0] is None and s.slots[1].next_token == 5 and b.generated == 1


def test_a_slot_whose_reader_falls_behind_pauses_then_stalls() -> None:
    clock = Clock()
    s = scheduler(num_slots=1, stream_buffer=2, stall_timeout=10.0, clock=clock)
    r = request(prompt_length=1, max_tokens=100)
    s.add([r])
    admit_all(s)
    run_step(s)
    run_step(s)  # two tokens sent, none read
    assert r.undelivered == 2
    assert s.plan().decode_rows == [] and r.paused_since == 0.0
    r.mark_delivered(1)  # the reader takes one: the slot goes on
    assert len(s.plan().decode_rows) == 1 and r.paused_since is None
    run_step(s)
    clock.now = 5.0
    assert s.plan().decode_rows == []
    clock.now = 15.1
    assert s.plan().decode_rows == [] and s.slots == [None]
    [finish] = s.take_stats().finishes
    assert finish.reason == "stalled" and "read nothing for 10 s" in finish.message


def test_the_step_record_has_what_the_metrics_need() -> None:
    clock = Clock()
    s = scheduler(num_slots=1, max_queue=1, clock=clock)
    first, second = request(prompt_length=5, max_tokens=2, tag=0), request(tag=1)
    s.add([first, second])
    clock.now = 1.0
    admit_all(s)
    run_step(s)
    clock.now = 1.5
    run_step(s)
    stats = s.take_stats()
    assert stats.queue_seconds == [1.0] and stats.prompt_tokens == 5
    assert stats.first_token_seconds == [1.5] and stats.generated_tokens == 1
    assert (stats.running, stats.waiting) == (1, 1)
    clock.now = 2.0
    run_step(s)
    stats = s.take_stats()
    assert stats.inter_token_seconds == [0.5] and stats.decode_batch == 1
    assert [f.reason for f in stats.finishes] == ["length"] and (stats.running, stats.waiting) == (0, 1)


def test_the_scheduler_and_these_tests_need_no_torch() -> None:
    environment = {**os.environ, "WINDOWLM_FORBID_TORCH": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", __file__]
    command += ["-k", "not need_no_torch"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
