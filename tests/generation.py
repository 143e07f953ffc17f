"""The test suite's oracle for the server's generation: one sequence alone, by the plainest loop over the
Decoder (prefill, then sample and feed one token at a time), with no scheduler, batching or events."""

from __future__ import annotations

import torch

from model.decoder import Decoder
from model.sampling import SamplingParams, SequenceSampler, sample_batch


def tokens_alone(model: torch.nn.Module, prompt: list[int], params: SamplingParams, max_tokens: int) -> list[int]:
    """Up to max_tokens ids sampled after the prompt; fewer where a model with absolute positions runs out of
    context (the last token is never fed back, so a prompt that fills the context still gets one)."""
    decoder = Decoder(model, num_slots=1)
    sampler = SequenceSampler(params, model.num_tokens)
    sampler.observe_prompt(prompt)
    logits = decoder.prefill(0, prompt)[None]  # (1, V)
    limit = decoder.context_limit
    tokens: list[int] = []
    while True:
        result = sample_batch(logits, [sampler])
        assert result.errors[0] is None, result.errors[0]
        tokens.append(int(result.tokens[0]))
        if len(tokens) == max_tokens or (limit is not None and decoder.position(0) >= limit):
            return tokens
        logits = decoder.decode(torch.tensor([0]), result.tokens)  # (1, V)
