"""The runner: carries out a step's plan on the Decoder and the sampler, and returns tokens and logprobs.

It knows slots, token ids and tensors; which slots run, and what becomes of their requests, is the scheduler's
business. A fault inside a step fails only the slots it belongs to: a batched prompt read or decode step that
raises is run again slot by slot (a chunk that still raises fails its slot), and a batch that cannot be sampled
is sampled row by row. A retry gives each slot what a batch would have, up to float rounding: a row's result
depends on no other row's values (see `sample` for the one exception).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from model.decoder import Decoder
from model.grammar import GrammarError, GrammarMatcher, masks
from model.sampling import ENDED_TOKEN, FAILED_TOKEN, NOTHING_ALLOWED, SampleResult, SequenceSampler, sample_batch
from model.transformer import LocalTransformer
from server.engine_request import EngineRequest, PromptLogprobsEvent
from server.faults import FaultInjector
from server.scheduler import DecodeRow, PromptChunk, SampledToken, StepOutput, StepPlan

logger = logging.getLogger("windowlm.engine")


class ModelRunner:
    def __init__(
        self,
        model: LocalTransformer,
        *,
        num_slots: int,
        prefill_chunk: int | None = None,
        faults: FaultInjector | None = None,
        read_whole_prompt: bool = False,
    ) -> None:
        self.model = model
        self.read_whole_prompt = read_whole_prompt
        self.device = next(model.parameters()).device
        self.decoder = Decoder(model, num_slots=num_slots, prefill_chunk=prefill_chunk)
        self.samplers: list[SequenceSampler | None] = [None] * num_slots
        self.matchers: list[GrammarMatcher | None] = [None] * num_slots  # of constrained requests
        self.faults = faults

    def chunk_end(self, start: int, end: int) -> int:
        return self.decoder.chunk_end(start, end)

    def reading_start(self, request: EngineRequest) -> int:
        """The first prompt token to read: the tokens before it cannot change the logits after the prompt nor
        anything a later step reads (model/receptive_field.py). 0 (read everything) for a model of unbounded
        reach, a request that scores its prompt, or when the settings ask for whole prompts."""
        if self.read_whole_prompt or request.prompt_logprobs is not None:
            return 0
        return self.decoder.reading_start(len(request.prompt))

    def start(self, slot: int, request: EngineRequest, read_from: int = 0) -> None:
        """Begin the request's sequence in `slot` at prompt position `read_from` (see reading_start): an empty
        cache, a sampler that has seen the whole prompt (penalties count every prompt token), and the start of the
        request's grammar if it has one."""
        sampler = SequenceSampler(request.params, self.model.num_tokens, device=self.device)
        if request.params.penalised:  # only the penalties read which tokens the prompt holds
            sampler.observe_prompt(request.prompt)
        matcher = None if request.grammar is None else request.grammar.matcher()
        self.decoder.reset(slot, read_from)
        self.samplers[slot], self.matchers[slot] = sampler, matcher

    def run(self, plan: StepPlan) -> StepOutput:
        """Read the plan's prompt chunks (scoring those of requests that want prompt logprobs), run one batched
        decode step over its decode rows, and sample a token for every slot that finished its prompt or decoded
        (one of max_tokens 0 samples nothing)."""
        output = StepOutput()
        to_sample: list[int] = []
        rows: list[Tensor] = []  # (1, V) or (B, V) logits, in the order of to_sample
        for chunk, logits in zip(plan.prompt_chunks, self.read_chunks(plan.prompt_chunks, output), strict=True):
            if logits is not None and chunk.samples:
                to_sample.append(chunk.slot)
                rows.append(logits[None])
        started = time.perf_counter()
        if plan.decode_rows:
            ran, logits = self.decode(plan.decode_rows, output.errors)  # (len(ran), V)
            to_sample += ran
            rows.append(logits)
        if to_sample:
            self.sample(to_sample, torch.cat(rows), output)
        if plan.decode_rows:
            output.decode_seconds = time.perf_counter() - started
        return output

    def read_chunks(self, chunks: list[PromptChunk], output: StepOutput) -> list[Tensor | None]:
        """Read every chunk of the step in one call -> for each, the logits (V,) after its last token, or None
        where it failed. If the call raises, each chunk is read alone and one that raises again fails its slot.
        Requests that want prompt logprobs get those of their chunk in `output.prompt_logprobs`."""
        if len(chunks) > 1:
            try:
                return self.read_together(chunks, output)
            except Exception:
                logger.exception("reading %d prompt chunks together failed; reading each alone", len(chunks))
        read: list[Tensor | None] = []
        for chunk in chunks:
            try:
                read += self.read_together([chunk], output)  # a list of one
            except Exception as error:  # this prompt cannot be read: its slot fails alone
                logger.exception("reading the prompt of request %d failed", chunk.request.id)
                output.errors[chunk.slot] = f"reading the prompt failed: {error}"
                read.append(None)
        return read

    def read_together(self, chunks: list[PromptChunk], output: StepOutput) -> list[Tensor | None]:
        """Read chunks in one Decoder call -> the logits (V,) after each, None for a chunk whose prompt scores
        could not be computed (its slot fails). Raises if the call does, having changed no slot's position (the
        ring entries it wrote are written again, the same, by a retry)."""
        if self.faults is not None:
            self.faults.check_prompt_chunks([chunk.request for chunk in chunks])
        scoring = [chunk.request.prompt_logprobs is not None for chunk in chunks]
        read = self.decoder.read_chunks(
            [chunk.slot for chunk in chunks],
            [torch.tensor(chunk.tokens, device=self.device) for chunk in chunks],  # (L_b,) each
            scoring,
        )  # (V,), or (L_b, V) for a scoring chunk
        output.read += chunks  # read: the slots have moved on, so nothing below may raise
        return [
            self.record_scores(chunk, logits, output) if score else logits
            for chunk, logits, score in zip(chunks, read, scoring, strict=True)
        ]

    def record_scores(self, chunk: PromptChunk, logits: Tensor, output: StepOutput) -> Tensor | None:
        """Put the prompt logprobs a scoring chunk's logits (L, V) give in `output` -> the logits after its last
        token (V,); None, and its slot fails alone, when they cannot be computed."""
        try:
            event = self.score_prompt(chunk, logits)
        except Exception as error:
            logger.exception("scoring the prompt of request %d failed", chunk.request.id)
            output.errors[chunk.slot] = f"scoring the prompt failed: {error}"
            return None
        if event is not None:
            output.prompt_logprobs[chunk.slot] = event
        return logits[-1]

    def score_prompt(self, chunk: PromptChunk, logits: Tensor) -> PromptLogprobsEvent | None:
        """The logprobs of the prompt tokens that the chunk's logits (L, V) predict: row i predicts token
        start + i + 1, so a chunk scores tokens start + 1 .. end, its last row the next chunk's first token
        (known already: the whole prompt is). None where it predicts none (the last token of a prompt)."""
        targets = chunk.request.prompt[chunk.start + 1 : chunk.end + 1]
        if not targets:
            return None
        logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)  # (T, V) of the raw logits
        ids = torch.tensor(targets, device=logprobs.device)  # (T,)
        columns = [logprobs.gather(1, ids[:, None]).double()]  # (T, 1)
        k = min(chunk.request.prompt_logprobs, logprobs.shape[-1])
        if k > 0:
            values, top_ids = logprobs.topk(k, dim=-1)  # (T, k) each, best first
            columns += [values.double(), top_ids.double()]  # ids are exact in float64
        rows = torch.cat(columns, dim=1).tolist()  # (T, 1 + 2k): one device sync for the chunk
        return PromptLogprobsEvent(
            start=chunk.start + 1,
            token_logprobs=[row[0] for row in rows],
            top_logprobs=[list(zip(map(int, row[1 + k :]), row[1 : 1 + k], strict=True)) for row in rows],
        )

    def decode(self, rows: list[DecodeRow], errors: dict[int, str]) -> tuple[list[int], Tensor]:
        """One token for each row (slots ascending) -> (the slots that ran, their logits (B, V)).

        If the batched step raises, each slot is run alone. A failed step leaves every slot where it was:
        positions advance only at the end of a step, and the ring rows it wrote are written again, with the same
        values, by the retry.
        """
        try:
            return [row.slot for row in rows], self.decode_rows(rows)
        except Exception:
            logger.exception("a decode step of %d slots failed; running each slot alone", len(rows))
        ran, logits = [], []
        for row in rows:
            try:
                logits.append(self.decode_rows([row]))
                ran.append(row.slot)
            except Exception as error:
                logger.exception("the decode step of request %d failed", row.request.id)
                errors[row.slot] = f"the decode step failed: {error}"
        return ran, torch.cat(logits) if logits else torch.empty(0, self.model.num_tokens, device=self.device)

    def decode_rows(self, rows: list[DecodeRow]) -> Tensor:
        """One decode step over slots [first, last] of the rows, in place -> logits (len(rows), V).

        Slots are admitted lowest index first, so the generating ones mostly fill a prefix; slots in that range
        that are free, paused or still reading their prompt ride along without advancing."""
        if self.faults is not None:
            self.faults.check_step([row.request for row in rows])
        first, span = rows[0].slot, rows[-1].slot + 1 - rows[0].slot
        fed = torch.tensor([row.token for row in rows])  # (B,)
        advance = None
        if len(rows) < span:  # some slots of the range ride along
            offsets = torch.tensor([row.slot - first for row in rows])  # (B,)
            fed = torch.zeros(span, dtype=torch.long).index_copy_(0, offsets, fed)  # (span,)
            advance = torch.zeros(span, dtype=torch.bool).index_fill_(0, offsets, True).to(self.device)  # (span,)
        failures = self.decoder.compiled_failures
        logits = self.decoder.decode(slice(first, first + span), fed.to(self.device), advance)  # (span, V)
        if self.decoder.compiled_failures > failures and (failures & (failures - 1)) == 0:  # 1st, 2nd, 4th, ...
            logger.warning(
                "the compiled decode step failed %d times, so far each time run eagerly instead; last: %s",
                self.decoder.compiled_failures,
                self.decoder.last_compiled_failure,
            )
        return logits if advance is None else logits[offsets.to(self.device)]

    def sample(self, slots: list[int], logits: Tensor, output: StepOutput) -> None:
        """One token for each of `slots` from its row of logits (B, V); a row that cannot be sampled fails.
        Unconstrained rows are sampled as a batch of their own, exactly as they would be without the others;
        constrained ones under their grammars' masks, and may end their text instead of taking a token.

        The masks are computed first, before anything waits for the logits: on a GPU they overlap the decode
        step's forward. On a CPU the forward holds every core, and masks and matchers take 2-3 % of a step
        (bench constrained), so no thread is spent on them."""
        rows = {slot: row for row, slot in enumerate(slots)}
        constrained = [slot for slot in slots if self.matchers[slot] is not None]
        constrained, allowed = self.grammar_masks(constrained, output) if constrained else ([], None)
        plain = [slot for slot in slots if self.matchers[slot] is None]
        for part_slots, part_allowed in ((plain, None), (constrained, allowed)):
            if not part_slots:
                continue
            part = logits
            if len(part_slots) < len(slots):
                part = logits[torch.tensor([rows[slot] for slot in part_slots], device=logits.device)]
            self.sample_part(part_slots, part, output, part_allowed)

    def grammar_masks(self, slots: list[int], output: StepOutput) -> tuple[list[int], Tensor | None]:
        """The next-token masks of constrained slots -> (the slots whose grammars have not failed, their masks
        (B, V + 1) on the device). A grammar that failed (a limit, an empty language) fails its request."""
        try:
            allowed = masks([self.matchers[slot] for slot in slots], self.device)  # (B, V + 1)
        except Exception as error:
            logger.exception("computing the grammar masks of %d rows failed", len(slots))
            output.errors.update((slot, f"the constraint failed: {error}") for slot in slots)
            return [], None
        failed = {slot: error for slot in slots if (error := self.matchers[slot].error) is not None}
        output.refused.update((slot, f"the constraint failed: {error}") for slot, error in failed.items())
        if not failed:
            return slots, allowed
        kept = [row for row, slot in enumerate(slots) if slot not in failed]
        return [slots[row] for row in kept], allowed[torch.tensor(kept, device=allowed.device)] if kept else None

    def sample_part(self, slots: list[int], logits: Tensor, output: StepOutput, allowed: Tensor | None) -> None:
        """Sample rows that are all unconstrained (allowed None), or all constrained by the masks `allowed`."""
        result = self.sample_rows([self.samplers[slot] for slot in slots], logits, allowed)
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()  # one device sync for the batch
        for row, slot in enumerate(slots):
            if result.errors[row] == NOTHING_ALLOWED:  # the request's constraint and logit_bias leave nothing
                output.refused[slot] = f"sampling failed: {result.errors[row]}"
            elif result.errors[row] is not None:
                output.errors[slot] = f"sampling failed: {result.errors[row]}"
            elif tokens[row] == ENDED_TOKEN:
                output.ended.append(slot)
            elif (complete := self.advance_grammar(slot, tokens[row], output)) is not None:
                sample = SampledToken(slot, tokens[row], logprobs[row], result.top_logprobs[row], complete)
                output.sampled.append(sample)

    def advance_grammar(self, slot: int, token: int, output: StepOutput) -> bool | None:
        """Move the slot's grammar past its sampled token -> whether the grammar is now complete (False for an
        unconstrained slot); None, and the request fails, if the grammar refuses the token or goes over a limit."""
        matcher = self.matchers[slot]
        if matcher is None:
            return False
        try:
            matcher.consume(token)
        except GrammarError as error:
            output.refused[slot] = f"the constraint failed: {error}"
            return None
        return matcher.complete

    def sample_rows(
        self, samplers: Sequence[SequenceSampler], logits: Tensor, allowed: Tensor | None = None
    ) -> SampleResult:
        """sample_batch; if it raises, row by row, so that only a row that cannot be sampled fails. (Rows of a
        batch that raised after its random draws draw again: their text stays valid, but a seeded one is no
        longer what it would be alone. sample_batch raises only on a bug: bad logits fail a row, not the batch.)"""
        try:
            return sample_batch(logits, samplers, allowed)
        except Exception as error:
            logger.exception("sampling %d rows failed", len(samplers))
            if len(samplers) == 1:
                message = f"{type(error).__name__}: {error}"
                return SampleResult(torch.full((1,), FAILED_TOKEN), torch.zeros(1), [[]], [message])
        rows = [
            self.sample_rows([sampler], logits[row : row + 1], None if allowed is None else allowed[row : row + 1])
            for row, sampler in enumerate(samplers)
        ]
        return SampleResult(
            torch.cat([one.tokens.cpu() for one in rows]),
            torch.cat([one.logprobs.cpu() for one in rows]),
            [one.top_logprobs[0] for one in rows],
            [one.errors[0] for one in rows],
        )
