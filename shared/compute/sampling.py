"""The target's choice of each output token: argmax, or a seeded draw.

Lossless sampling: the token at output position i is drawn from the target's
distribution at the accepted prefix with a generator seeded by (seed, i). A
speculative child is accepted only if it equals that draw, so every policy,
stage count and batch composition yields the same tokens as plain decoding.
Requests with processing (grammar, bias, penalties, min_p) have their rows
processed on the CPU first (processing.py), each with its own node's history.
"""

from __future__ import annotations

import torch

from shared.compute.processing import NodeContext, process
from shared.types.batch import TokenLogprob
from shared.types.config import SamplingParams

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): independent streams per output position."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, min_p, top-k and top-p applied to one row of logits [V] -> probs [V]."""
    scaled = logits.float() / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token crossing top_p
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    return torch.softmax(scaled, dim=-1)


def target_tokens(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
                  contexts: list[NodeContext | None] | None = None) -> list[int]:
    """target_token for each row of logits [m, V] on any device: the plain greedy rows by one argmax there, the
    others on the CPU (one row's logits copied over, processed with its node's context), so CPU and CUDA pick the
    same token for the same logits and only the chosen tokens cross back to the host."""
    contexts = contexts or [None] * len(params)
    on_device = [p.greedy and not p.processed for p in params]  # plain greedy rows: one argmax where they are
    greedy = [j for j, plain in enumerate(on_device) if plain]
    picks = [0] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for j, token in zip(greedy, torch.argmax(rows, dim=-1).tolist()):
            picks[j] = token
    for j, p in enumerate(params):
        if not on_device[j]:
            row = logits[j].float().cpu()
            picks[j] = target_token(process(row, p, contexts[j]) if p.processed else row, p, output_indices[j])
    return picks


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The raw model's log-probability of `token` and its `top` most likely tokens, from logits [V] (before any
    processing: vLLM's default logprobs mode, so a penalty or a grammar does not change what is reported)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(float(logprobs[token]), best.indices.tolist() if best else [],
                        best.values.tolist() if best else [])


def target_token(logits: torch.Tensor, params: SamplingParams, output_index: int) -> int:
    """The token at output position `output_index` given the logits before it ([V])."""
    if params.greedy:
        return int(torch.argmax(logits))
    generator = torch.Generator().manual_seed(position_seed(params.seed, output_index))
    return int(torch.multinomial(filtered_probs(logits, params), 1, generator=generator))
