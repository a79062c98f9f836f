"""DistrAttention: self-attention with a narrower Q·Kᵀ, for long prefills.

DistrAttention (Jin, Xiao, Yuan et al., 2025) keeps the whole context but
shrinks the inner dimension d of the score product. Within a block of l query
rows some of Q's d columns point the same way, so for each (query block, head):

  1. hash: each column of the block (a vector of length l) gets a SimHash code,
     the signs of `hash_bits` seeded Gaussian projections (angular LSH);
  2. sort: the d columns are ordered by code, so similar columns sit together;
  3. fuse: the order is cut into d / G groups of G adjacent columns; Q keeps one
     representative per group (the mean) and K sums the matching columns:
         S = Q·Kᵀ = Σ_c q_c k_cᵀ  ≈  Σ_groups mean(q_group) · sum(k_group)ᵀ = Q'·K'ᵀ,
     exact when a group's columns are equal, and for G = 1 up to rounding.

Softmax and P·V stay exact at full width, with scale 1/sqrt(d). One block's
column order applies to every key tile the block meets, inside a flash-style
loop (online softmax over key tiles), so memory stays O(N·d) plus one
[l, k_tile] score tile per head.

Notation: n = query rows, h = query heads, g = kv heads, r = h // g (GQA: query
head j uses kv head j // r), d = head dim, G = group size, l = block rows,
t = key tile, L = keys, b = hash bits. Query row i sits at position
q_offset + i; with causal masking it attends keys 0 .. q_offset + i.

This is the fp32 CPU form of the method: there is no GPU on this project's
machines, so there is no Triton/CUDA kernel here (an untested kernel would be
a stub), and the paper's speed-ups, which come from such a kernel, are not
expected on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from shared.types.config import AttentionConfig


def simhash_codes(columns: torch.Tensor, hash_bits: int, generator: torch.Generator) -> torch.Tensor:
    """SimHash code per column: bit i is set when the column has a positive dot product with projection i.

    columns: [..., d, l] -> [..., d] int64 in [0, 2**hash_bits). The projections
    are drawn from `generator` in fp32, so fp32 and fp64 inputs hash alike.
    """
    projections = torch.randn(columns.shape[-1], hash_bits, generator=generator).to(columns.dtype)  # [l, b]
    bits = (columns @ projections) > 0  # [..., d, b]
    weights = 2 ** torch.arange(hash_bits)  # [b] int64
    return (bits.long() * weights).sum(-1)


def group_permutation(q_block: torch.Tensor, cfg: AttentionConfig) -> torch.Tensor:
    """Column order of each head's query block, similar columns adjacent. q_block: [g, r, l, d] -> [g, r, d].

    Every block and head hashes with the same projections (a generator seeded
    with cfg.seed), so the order depends only on the block's own numbers.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    codes = simhash_codes(q_block.transpose(-1, -2), cfg.hash_bits, generator)  # [g, r, d]
    return torch.sort(codes, dim=-1, stable=True).indices


def fuse_queries(q_block: torch.Tensor, order: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of each group's Q columns. q_block: [g, r, l, d], order: [g, r, d] -> [g, r, l, d/G]."""
    l = q_block.shape[-2]
    index = order[:, :, None, :].expand(-1, -1, l, -1)  # [g, r, l, d]
    return torch.gather(q_block, -1, index).unflatten(-1, (-1, group_size)).mean(-1)


def fuse_keys(k_tile: torch.Tensor, order: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of each group's K columns, in each query head's order.

    k_tile: [t, g, d], order: [g, r, d] -> [g, r, t, d/G].
    """
    g, r, d = order.shape
    t = k_tile.shape[0]
    keys = k_tile.transpose(0, 1)[:, None].expand(g, r, t, d)  # [g, r, t, d], kv head shared by its r query heads
    index = order[:, :, None, :].expand(g, r, t, d)
    return torch.gather(keys, -1, index).unflatten(-1, (-1, group_size)).sum(-1)


def causal_mask(q_start: int, rows: int, k_start: int, keys: int) -> torch.Tensor:
    """True where key position > query position. -> [rows, keys]."""
    query_pos = torch.arange(q_start, q_start + rows)[:, None]
    key_pos = torch.arange(k_start, k_start + keys)[None, :]
    return key_pos > query_pos


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, causal: bool, q_offset: int
) -> None:
    """Shapes must fit ([n, h, d] against [L, g, d] with g dividing h) and causal queries need their keys."""
    (n, h, d), (length, g, _) = q.shape, k.shape
    if k.shape != v.shape or k.shape[-1] != d or h % g:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q_offset + n > length:
        raise ValueError(f"causal queries reach position {q_offset + n - 1} but there are only {length} keys")
    cfg.check_head_dim(d)


def _blocks(q: torch.Tensor, kv_heads: int, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, q_block [g, r, l, d]) for each block of l query rows."""
    for start in range(0, q.shape[0], block_rows):
        yield start, q[start : start + block_rows].permute(1, 0, 2).unflatten(0, (kv_heads, -1))


def distr_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, causal: bool = True, q_offset: int = 0
) -> torch.Tensor:
    """Untiled DistrAttention: each query block's whole score matrix at once (the readable reference).

    q: [n, h, d]; k, v: [L, g, d] -> [n, h, d].
    """
    _check(q, k, v, cfg, causal, q_offset)
    g, d, G = k.shape[1], q.shape[-1], cfg.group_size
    values = v.transpose(0, 1)[:, None]  # [g, 1, L, d]
    out = torch.empty_like(q)
    for start, q_block in _blocks(q, g, cfg.block_rows):
        l = q_block.shape[-2]
        order = group_permutation(q_block, cfg)  # [g, r, d]
        q_fused = fuse_queries(q_block, order, G) * d**-0.5  # [g, r, l, d/G]
        scores = q_fused @ fuse_keys(k, order, G).transpose(-1, -2)  # [g, r, l, L]
        if causal:
            scores = scores.masked_fill(causal_mask(q_offset + start, l, 0, k.shape[0]), float("-inf"))
        out_block = torch.softmax(scores, dim=-1) @ values  # [g, r, l, d]
        out[start : start + l] = out_block.flatten(0, 1).transpose(0, 1)  # [l, h, d]
    return out


def distr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    causal: bool = True,
    q_offset: int = 0,
    k_tile: int = 512,
) -> torch.Tensor:
    """Flash-style DistrAttention: per query block, key tiles with an online softmax.

    q: [n, h, d]; k, v: [L, g, d] -> [n, h, d]. Equals distr_attention_reference
    up to rounding; only one [g, r, l, k_tile] score tile exists at a time.
    """
    _check(q, k, v, cfg, causal, q_offset)
    if k_tile < 1:
        raise ValueError("k_tile must be >= 1")
    g, d, G = k.shape[1], q.shape[-1], cfg.group_size
    out = torch.empty_like(q)
    for start, q_block in _blocks(q, g, cfg.block_rows):
        l = q_block.shape[-2]
        first_query = q_offset + start
        order = group_permutation(q_block, cfg)  # [g, r, d]
        q_fused = fuse_queries(q_block, order, G) * d**-0.5  # [g, r, l, d/G]
        row_max = torch.full(q_block.shape[:-1], float("-inf"), dtype=q.dtype)  # [g, r, l]
        row_sum = torch.zeros(q_block.shape[:-1], dtype=q.dtype)  # [g, r, l]
        acc = torch.zeros(q_block.shape, dtype=q.dtype)  # [g, r, l, d]
        visible = first_query + l if causal else k.shape[0]  # keys [0, visible) reach some row of the block
        for k_start in range(0, visible, k_tile):
            t = min(k_tile, visible - k_start)
            scores = q_fused @ fuse_keys(k[k_start : k_start + t], order, G).transpose(-1, -2)  # [g, r, l, t]
            if causal and k_start + t - 1 > first_query:  # the tile reaches past the block's first query
                scores = scores.masked_fill(causal_mask(first_query, l, k_start, t), float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(-1))  # [g, r, l]; finite from the first tile (key 0)
            probs = torch.exp(scores - new_max[..., None])  # [g, r, l, t]
            correction = torch.exp(row_max - new_max)  # [g, r, l]
            row_sum = row_sum * correction + probs.sum(-1)
            values = v[k_start : k_start + t].transpose(0, 1)[:, None]  # [g, 1, t, d]
            acc = acc * correction[..., None] + probs @ values  # [g, r, l, d]
            row_max = new_max
        out[start : start + l] = (acc / row_sum[..., None]).flatten(0, 1).transpose(0, 1)  # [l, h, d]
    return out
