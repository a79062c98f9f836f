"""Logits processing at one tree node: what plain decoding applies at a position, from that node's own history.

Order (vLLM's): the grammar's mask, logit_bias, then the penalties; temperature, min_p, top-k and top-p follow in
sampling.filtered_probs. Penalties follow vLLM: presence and frequency count the generated tokens before the
position; repetition covers prompt and generated tokens, dividing a positive logit and multiplying a negative one.
Everything is a function of (logits, prompt, output before the position), so a tree node gets exactly the
distribution plain decoding has at the same prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.types.config import SamplingParams


@dataclass(frozen=True)
class NodeContext:
    """What a node's choice depends on besides its logits."""

    prompt: Sequence[int]  # the request's prompt ids
    output: Sequence[int]  # tokens generated before the position (committed output, then the node's path)
    allowed: torch.Tensor | None = None  # [V] bool: the grammar's mask after `output`; None: no grammar


def process(logits: torch.Tensor, params: SamplingParams, ctx: NodeContext | None) -> torch.Tensor:
    """One row of logits [V] (CPU) -> the processed logits [V] (float32, a new tensor)."""
    x = logits.float().clone()
    if ctx is not None and ctx.allowed is not None:
        x = x.masked_fill(~ctx.allowed[: x.shape[0]], float("-inf"))
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        keep = ids < x.shape[0]
        x.index_add_(0, ids[keep], bias[keep])
    if params.penalized and ctx is not None:
        x = penalize(x, ctx.prompt, ctx.output, params)
    return x


def penalize(x: torch.Tensor, prompt: Sequence[int], output: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Repetition, frequency and presence penalties on logits [V] (vLLM's apply_penalties for one row)."""
    vocab = x.shape[0]
    counts = torch.bincount(torch.tensor(list(output), dtype=torch.long), minlength=vocab)[:vocab]  # [V]
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen[torch.tensor(list(prompt), dtype=torch.long)] = True
        penalized = torch.where(x > 0, x / params.repetition_penalty, x * params.repetition_penalty)
        x = torch.where(seen, penalized, x)
    return x - params.frequency_penalty * counts.float() - params.presence_penalty * (counts > 0).float()
