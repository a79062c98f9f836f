"""A draft LM head over part of the vocabulary: the frequent tokens, and each request's own.

A small draft's LM head is a fifth of its forward over a 152k vocabulary
(Qwen2.5-0.5B: 136M of its 494M weights, all read every step). Scoring only
the tokens a draft is likely to propose cuts that traffic (FR-Spec, Zhao et
al. 2025; SGLang's --speculative-token-map). The target verifies every token,
so outputs do not change; a token the head cannot score is simply never
proposed.

Which tokens: a byte-level BPE numbers its tokens in merge order, and a merge
ranks by its pair's count in the tokenizer's corpus, so the first ids are the
frequent ones, a ranking that needs no corpus of ours. Rare tokens a text
repeats (a name in code, a term in a document to summarise) come from the
request's own text: its tokens past the frequent ones are scored too, from
rows of the whole head gathered per step (one per distinct rare token of the
request: tens to hundreds in a prompt, against the tens of thousands of the
frequent ones). A cost model times the frequent tokens' head only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shared.compute.model import rms_norm
from shared.types.config import ModelArch, check_draft_vocab


def head_tokens(arch: ModelArch, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The frequent tokens a subset head scores: the first n ids and the end-of-sequence ones, ascending."""
    if n == 0:
        raise ValueError("head_tokens needs n > 0: a draft vocabulary of 0 is every token (subset_tokens)")
    check_draft_vocab(n)  # ConfigError for too few, or negative
    ids = sorted(set(range(min(n, arch.vocab_size))) | {e for e in arch.eos_token_ids if e < arch.vocab_size})
    return torch.tensor(ids, dtype=torch.long, device=device)


def subset_tokens(arch: ModelArch, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """head_tokens for a draft vocabulary setting, or None where the head keeps every token (0, or as many as the
    model has)."""
    return head_tokens(arch, vocab, device) if vocab != 0 and vocab < arch.vocab_size else None


class SubsetHead:
    """Widens the frequent tokens' logits with each request's own rarer tokens, and maps columns to token ids."""

    def __init__(self, tokens: torch.Tensor, full_head: torch.Tensor, final_norm: torch.Tensor, eps: float,
                 lin: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.tokens = tokens  # [N] the token of each row of the draft's (subset) LM head
        self.full_head = full_head  # [V, H] every token's row (the embedding, when tied): read only for own tokens
        self.final_norm, self.eps = final_norm, eps
        self.lin = lin  # the runner's kind of product (row-invariant under exact numerics), over unpacked rows
        self.frequent = frozenset(tokens.tolist())
        self.own: dict[str, tuple[int, list[int], set[int]]] = {}  # request -> (text read, its rare tokens, as set)

    def read(self, request_id: str, text: list[int]) -> None:
        """Note the rare tokens of a request's accepted text (read incrementally: the text only grows)."""
        seen, own, known = self.own.get(request_id, (0, [], set()))
        for token in text[seen:]:
            if token not in self.frequent and token not in known:
                known.add(token)
                own.append(token)
        self.own[request_id] = (len(text), own, known)

    def forget(self, request_id: str) -> None:
        self.own.pop(request_id, None)

    def widen(self, x: torch.Tensor, logits: torch.Tensor, requests: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states x [m, H] and their frequent-token logits [m, N] -> logits [m, N + E] and the token id of
        each column [m, N + E], E the most own tokens of any row's request (fewer: -inf columns)."""
        m, device = x.shape[0], x.device
        widest = max(len(self.own[rid][1]) for rid in requests)  # every request read first
        extra = torch.full((m, widest), float("-inf"), dtype=logits.dtype, device=device)  # [m, E]
        extra_ids = torch.zeros((m, widest), dtype=torch.long, device=device)  # [m, E]
        if widest:
            normed = rms_norm(x, self.final_norm, self.eps)  # [m, H]
            for rid in dict.fromkeys(requests):  # each request once, in order
                own = self.own[rid][1]
                if not own:
                    continue
                rows = torch.tensor([j for j, r in enumerate(requests) if r == rid], device=device)
                ids = torch.tensor(own, dtype=torch.long, device=device)  # [e]
                extra[rows, : len(own)] = self.lin(normed[rows], self.full_head[ids]).to(logits.dtype)  # [r, e]
                extra_ids[rows, : len(own)] = ids
        ids = torch.cat([self.tokens.expand(m, -1), extra_ids], dim=1)  # [m, N + E]
        return torch.cat([logits, extra], dim=1), ids
