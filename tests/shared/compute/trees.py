"""Builders the compute tests share: a prefilled request, and a random tree of nodes in topological order."""

from __future__ import annotations

import torch

from shared.compute.runner import RequestInfo, StageRunner
from shared.types.batch import MicroBatch, Row
from shared.types.config import SamplingParams


def prefill(runner: StageRunner, rid: str, prompt: list[int], prompt_len: int | None = None) -> None:
    """Register `rid` and write the KV of `prompt` as one committed chunk; with prompt_len, the tokens past it
    are the request's output (plain decoding's committed tokens), not its prompt."""
    runner.add_request(rid, RequestInfo(len(prompt) if prompt_len is None else prompt_len, SamplingParams()), 256)
    runner.hidden(MicroBatch(0, [Row(rid, -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(prompt)]))


def random_tree(parents: list[int], seed: int) -> tuple[list[int], list[int], list[int]]:
    """(parent, depth, token) per node from hypothesis' draws: node i's parent is an earlier node (or -1, the
    prompt), so the nodes are in topological order."""
    tokens = torch.randint(3, 400, (len(parents),), generator=torch.Generator().manual_seed(seed)).tolist()
    par = [-1 if p >= i or p == 0 else p - 1 for i, p in enumerate(parents)]
    depth: list[int] = []
    for p in par:
        depth.append(0 if p == -1 else depth[p] + 1)
    return par, depth, tokens


def tree_rows(rid: str, prompt_len: int, par: list[int], depth: list[int], tokens: list[int]) -> list[Row]:
    return [Row(rid, i, p, prompt_len + depth[i], tokens[i], False, True) for i, p in enumerate(par)]
