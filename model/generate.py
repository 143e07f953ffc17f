"""local-attention's `generate`, on the sliding cache: sample a fixed number of tokens after each prompt row.

The server does not use this loop (its engine batches requests that come and go); both drive the same Decoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.decoder import Decoder
from model.sampling import SamplingParams, SequenceSampler, sample_batch

if TYPE_CHECKING:
    from model.transformer import LocalTransformer


def reference_samplers(
    batch: int, vocab_size: int, temperature: float, filter_thres: float, seed: int | None, device: torch.device
) -> list[SequenceSampler]:
    """One sampler per row with local-attention's sampling: top (1 - filter_thres) of the vocabulary."""
    samplers = []
    for row in range(batch):
        row_seed = None if seed is None else (seed + row + 2**63) % 2**64 - 2**63  # seed + row, kept signed 64-bit
        params = SamplingParams(temperature=temperature, filter_thres=filter_thres, seed=row_seed)
        samplers.append(SequenceSampler(params, vocab_size, device=device))
    return samplers


def next_tokens(logits: Tensor, samplers: list[SequenceSampler]) -> Tensor:
    """Sample one token per row of logits (b, V); a row that cannot be sampled raises."""
    result = sample_batch(logits, samplers)
    for row, error in enumerate(result.errors):
        if error is not None:
            raise ValueError(f"cannot sample row {row}: {error}")
    return result.tokens


@torch.no_grad()
def generate(
    model: LocalTransformer,
    prime: Tensor,
    seq_len: int,
    temperature: float = 1.0,
    filter_thres: float = 0.9,
    seed: int | None = None,
) -> Tensor:
    """Sample seq_len tokens after each row of prime (b, n) with the sliding cache -> (b, seq_len); each prompt
    is read from where it can still matter (Decoder.read_prompt), with the logits of reading all of it."""
    batch = prime.shape[0]
    samplers = reference_samplers(batch, model.num_tokens, temperature, filter_thres, seed, prime.device)
    decoder = Decoder(model, num_slots=batch)
    logits = torch.stack([decoder.read_prompt(slot, prime[slot]) for slot in range(batch)])  # (b, V)
    sampled = []
    for index in range(seq_len):
        token = next_tokens(logits, samplers)  # (b,)
        sampled.append(token)
        if index + 1 < seq_len:
            logits = decoder.decode_all(token)
    return torch.stack(sampled, dim=1) if sampled else prime.new_zeros((batch, 0))


@torch.no_grad()
def generate_uncached(
    model: LocalTransformer,
    prime: Tensor,
    seq_len: int,
    temperature: float = 1.0,
    filter_thres: float = 0.9,
    seed: int | None = None,
) -> Tensor:
    """generate() by a full forward per token over the last max_seq_len tokens: slow, for comparison."""
    samplers = reference_samplers(prime.shape[0], model.num_tokens, temperature, filter_thres, seed, prime.device)
    out = prime
    for _ in range(seq_len):
        logits = model(out[:, -model.max_seq_len :])[:, -1]
        out = torch.cat((out, next_tokens(logits, samplers)[:, None]), dim=1)
    return out[:, prime.shape[1] :]
