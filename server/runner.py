"""The model side of the engine: prompt chunks, batched decode steps and sampling on the Decoder's slots.

The runner knows slots, token ids and tensors; which slots run, and what becomes of their requests, is the
engine's business. A fault inside a step fails only the slots it belongs to: a batched decode step that raises
is run again slot by slot, and a batch that cannot be sampled is sampled row by row, both exact because decoding
and sampling are batch-invariant (see `sample` for the one exception).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from model.decoder import Decoder
from model.sampling import FAILED_TOKEN, SampleResult, SamplingParams, SequenceSampler, sample_batch
from model.transformer import LocalTransformer
from server.engine_request import EngineRequest
from server.faults import FaultInjector

logger = logging.getLogger("windowlm.engine")


class ModelRunner:
    def __init__(
        self,
        model: LocalTransformer,
        *,
        num_slots: int,
        prefill_chunk: int | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.decoder = Decoder(model, num_slots=num_slots, prefill_chunk=prefill_chunk)
        self.faults = faults

    @property
    def context_limit(self) -> int | None:
        return self.decoder.context_limit

    def start(self, slot: int, params: SamplingParams, prompt: list[int]) -> SequenceSampler:
        """Begin a sequence in `slot`: an empty cache, and the sampler that has seen its prompt."""
        sampler = SequenceSampler(params, self.model.num_tokens, device=self.device)
        sampler.observe_prompt(prompt)
        self.decoder.reset(slot)
        return sampler

    def chunk_end(self, start: int, end: int) -> int:
        return self.decoder.chunk_end(start, end)

    def read_chunk(self, slot: int, tokens: list[int]) -> Tensor:
        """Feed prompt tokens to `slot` -> the logits after the last one (1, V)."""
        return self.decoder.read_chunk(slot, torch.tensor(tokens, device=self.device))[None]

    def decode(
        self, slots: list[int], tokens: list[int], requests: list[EngineRequest]
    ) -> tuple[list[int], Tensor, dict[int, str]]:
        """One token for each of `slots` (ascending) -> (the slots that ran, their logits (B, V), errors by slot).

        If the batched step raises, each slot is run alone. A failed step leaves every slot where it was:
        positions advance only at the end of a step, and the ring rows it wrote are written again, with the same
        values, by the retry.
        """
        try:
            return slots, self.decode_slots(slots, tokens, requests), {}
        except Exception:
            logger.exception("a decode step of %d slots failed; running each slot alone", len(slots))
        ran, rows, errors = [], [], {}
        for slot, token, request in zip(slots, tokens, requests, strict=True):
            try:
                rows.append(self.decode_slots([slot], [token], [request]))
                ran.append(slot)
            except Exception as error:
                logger.exception("the decode step of request %d failed", request.id)
                errors[slot] = f"the decode step failed: {error}"
        return ran, torch.cat(rows) if rows else torch.empty(0), errors

    def decode_slots(self, slots: list[int], tokens: list[int], requests: list[EngineRequest]) -> Tensor:
        """One decode step over slots [first, last] of `slots` in place -> logits (len(slots), V).

        Slots are admitted lowest index first, so the generating ones mostly fill a prefix; slots in that range
        that are free, paused or still reading their prompt ride along without advancing."""
        if self.faults is not None:
            self.faults.check_step(requests)
        first, span = slots[0], slots[-1] + 1 - slots[0]
        fed = torch.tensor(tokens)  # (B,)
        advance = None
        if len(slots) < span:  # some slots of the range ride along
            rows = torch.tensor(slots) - first  # (B,)
            fed = torch.zeros(span, dtype=torch.long).index_copy_(0, rows, fed)  # (span,)
            advance = torch.zeros(span, dtype=torch.bool).index_fill_(0, rows, True).to(self.device)  # (span,)
        logits = self.decoder.decode(slice(first, first + span), fed.to(self.device), advance)  # (span, V)
        return logits if advance is None else logits[rows.to(self.device)]

    def sample(self, samplers: Sequence[SequenceSampler], logits: Tensor) -> SampleResult:
        """sample_batch; if it raises, row by row, so that only a row that cannot be sampled fails. (Rows of a
        batch that raised after its random draws draw again: their text stays valid, but a seeded one is no
        longer what it would be alone. sample_batch raises only on a bug: bad logits fail a row, not the batch.)"""
        try:
            return sample_batch(logits, samplers)
        except Exception as error:
            logger.exception("sampling %d rows failed", len(samplers))
            if len(samplers) == 1:
                message = f"{type(error).__name__}: {error}"
                return SampleResult(torch.full((1,), FAILED_TOKEN), torch.zeros(1), [[]], [message])
        rows = [self.sample([sampler], logits[row : row + 1]) for row, sampler in enumerate(samplers)]
        return SampleResult(
            torch.cat([one.tokens.cpu() for one in rows]),
            torch.cat([one.logprobs.cpu() for one in rows]),
            [one.top_logprobs[0] for one in rows],
            [one.errors[0] for one in rows],
        )
