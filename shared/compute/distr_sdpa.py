"""DistrAttention through SDPA's own fused CPU kernel: the fused queries spread back to full width.

Q'·K'ᵀ needs K' [L, d/G] in every query block's own grouping, and torch's CPU flash kernel takes one head dim
for q, k and v. Both go away with one identity. Let Q̃ be Q' spread back over the columns it came from:
- mean_sum: Q̃[:, c] = Q'[:, j] for every column c of group j (K'_j = Σ_{c in group j} K[:, c]);
- sum_one: Q̃[:, c] = Q'[:, j] for c = the group's KEY_SLOT column (K'_j = K[:, c]), 0 elsewhere.
Then Q̃·Kᵀ = Σ_j Q'_j·K'_jᵀ = Q'·K'ᵀ with the original K, so DistrAttention is SDPA(Q̃, K, V) with scale 1/sqrt(d):
one fused kernel call, no per-block K', equal to distr_attention_reference up to rounding. It does the work of
exact attention (the inner dimension is d again), so it costs what SDPA costs plus the spread (O(n·d)).

Notation as in distr_attention.py: n query rows, h query heads, g kv heads, r = h // g, d head dim, G group size,
nb query blocks of l rows, L keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.compute.distr_attention import causal_mask, check_inputs
from shared.compute.distr_groups import KEY_SLOT, column_groups
from shared.types.config import AttentionConfig


def spread_queries(q: torch.Tensor, groups: torch.Tensor, block_rows: int, fuse: str) -> torch.Tensor:
    """Q̃: each block's fused queries on the columns they stand for. q: [n, h, d]; groups: [nb, h, G, d/G] -> [n, h, d].

    All blocks at once, as in column_groups: the ragged last block is zero-padded.
    """
    (n, h, d), (blocks, _, G, width) = q.shape, groups.shape
    padded = q.new_zeros(blocks * block_rows, h, d)
    padded[:n] = q
    blocked = padded.view(blocks, block_rows, h, d)  # [nb, l, h, d]
    index = groups.reshape(blocks, 1, h, d).expand(blocks, block_rows, h, d)  # slot-major: t * d/G + j
    columns = torch.gather(blocked, -1, index).view(blocks, block_rows, h, G, width)  # [nb, l, h, G, d/G]
    if fuse == "mean_sum":  # every column reads its group's mean: one gather (a scatter is twice as slow here)
        group_of = torch.arange(width, device=q.device).repeat(G).expand(blocks, h, d)  # group of slot-major column
        owner = torch.empty_like(group_of).scatter_(-1, groups.reshape(blocks, h, d), group_of)  # [nb, h, d]
        spread = torch.gather(columns.mean(-2), -1, owner[:, None].expand(blocks, block_rows, h, d))
    else:  # sum_one: the group's sum on its KEY_SLOT column, zero on the others
        key_index = groups[:, None, :, min(KEY_SLOT, G - 1)].expand(blocks, block_rows, h, width)
        spread = torch.zeros_like(blocked).scatter_(-1, key_index, columns.sum(-2))
    return spread.view(-1, h, d)[:n]


def distr_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, causal: bool = True, q_offset: int = 0
) -> torch.Tensor:
    """DistrAttention as one SDPA call on Q̃. q: [n, h, d]; k, v: [L, g, d] -> [n, h, d].

    A first chunk (q_offset 0) or no mask: is_causal and enable_gqa, so torch's CPU flash
    kernel skips the masked tiles and reads each kv head for its r query heads. A chunk after a prefix: an
    explicit [n, L] mask (torch's is_causal aligns row 0 with key 0), which the flash kernel computes in full;
    shared.compute.distr_attention.distr_attention is faster there.
    """
    check_inputs(q, k, v, cfg, causal, q_offset)
    (n, h, _), (length, g, _) = q.shape, k.shape
    spread = spread_queries(q, column_groups(q, cfg), cfg.block_rows, cfg.fuse)  # [n, h, d]
    queries, keys, values = (x.transpose(0, 1)[None] for x in (spread, k, v))  # [1, h | g, n | L, d]
    mask = None
    if causal and q_offset:
        mask = causal_mask(q_offset, n, 0, length, q.device).logical_not_()[None, None]  # [1, 1, n, L]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                         enable_gqa=h != g)
    return out[0].transpose(0, 1)
