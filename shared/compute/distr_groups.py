"""DistrAttention's column groups: which of Q's d columns fuse, and how Q and K fuse them.

For each block of l query rows and each head (docs/distrattention.md, sections 1-3):

  1. hash: each of the block's d columns (a vector of l rows) gets a SimHash code:
     bit i = [column · p_i > 0] for `hash_bits` seeded Gaussian projections p_i of
     length l, code = Σ bit_i·2^i; with bucket "gray" the code is then mapped to
     its reflected Gray code x ^ (x >> 1), the authors' `perm[bin]`;
  2. sort: `order` = the stable argsort of the d codes;
  3. group: layout "strided" (the authors' kernels) makes group j = {order[j + t·d/G] : t < G};
     "adjacent" makes it order[G·j : G·j + G];
  4. fuse: "mean_sum" (their ViT accuracy path) keeps Q' = mean of the group's Q columns
     and K' = sum of its K columns; "sum_one" (their speed kernels) keeps Q' = sum and
     K' = the group's K column in slot 1, K[:, order[d/G + j]] when strided.

Q'·K'ᵀ then stands for Q·Kᵀ with inner dimension d / G. Groups are returned as
[..., G, d/G] column indices: groups[t, j] is the t-th column of group j.
Notation: n = query rows, h = query heads, d = head dim, G = group size,
l = block rows, nb = query blocks, b = hash bits, L = keys.
"""

from __future__ import annotations

import torch

from shared.types.config import AttentionConfig

KEY_SLOT = 1  # sum_one: the slot of each group whose K column stands for the group (the authors' `even_v`)


def hash_projections(cfg: AttentionConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The SimHash projections, one per code bit, each as long as a query block: [l, b].

    Drawn in fp32 from a generator seeded with cfg.seed, so every dtype and device
    hashes alike; a block of m < l rows uses the first m rows (the zero-padded block).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.block_rows, cfg.hash_bits, generator=generator).to(device, dtype)


def simhash_codes(columns: torch.Tensor, projections: torch.Tensor, bucket: str = "binary") -> torch.Tensor:
    """SimHash code per column. columns: [..., d, m], projections: [>= m, b] -> [..., d] int64 in [0, 2**b)."""
    bits = (columns @ projections[: columns.shape[-1]]) > 0  # [..., d, b]
    weights = 2 ** torch.arange(projections.shape[-1], device=columns.device)  # [b]
    codes = (bits.long() * weights).sum(-1)
    return codes ^ (codes >> 1) if bucket == "gray" else codes


def column_groups(q: torch.Tensor, cfg: AttentionConfig) -> torch.Tensor:
    """Each query block's column groups for each head. q: [n, h, d] -> [nb, h, G, d/G] int64.

    All blocks at once: the ragged last block is zero-padded, which hashes as its own m rows would. The hash
    runs in fp32 whatever q's dtype, so a bf16 kernel and an fp32 reference of the same inputs group alike.
    """
    (n, h, d), l, G = q.shape, cfg.block_rows, cfg.group_size
    blocks = -(-n // l)
    padded = torch.zeros(blocks * l, h, d, device=q.device)
    padded[:n] = q
    columns = padded.view(blocks, l, h, d).permute(0, 2, 3, 1)  # [nb, h, d, l]
    codes = simhash_codes(columns, hash_projections(cfg, torch.float32, q.device), cfg.bucket)  # [nb, h, d]
    order = torch.sort(codes, dim=-1, stable=True).indices  # [nb, h, d]
    if cfg.layout == "strided":
        return order.view(blocks, h, G, d // G)
    return order.view(blocks, h, d // G, G).transpose(-1, -2).contiguous()


def fuse_queries(q_block: torch.Tensor, groups: torch.Tensor, fuse: str) -> torch.Tensor:
    """Q' of one block: mean (mean_sum) or sum (sum_one) of each group's columns.

    q_block: [h, m, d], groups: [h, G, d/G] -> [h, m, d/G].
    """
    (h, m, d), G = q_block.shape, groups.shape[1]
    index = groups.reshape(h, 1, d).expand(h, m, d)  # [h, m, d]
    columns = torch.gather(q_block, -1, index).view(h, m, G, d // G)  # [h, m, G, d/G]
    return columns.mean(-2) if fuse == "mean_sum" else columns.sum(-2)


def fuse_keys(keys: torch.Tensor, groups: torch.Tensor, fuse: str) -> torch.Tensor:
    """K' of one head: sum (mean_sum) of each group's columns, or its column in KEY_SLOT (sum_one).

    keys: [L, d] (the head's kv head), groups: [G, d/G] -> [L, d/G].
    """
    if fuse == "sum_one":
        return keys.index_select(-1, groups[min(KEY_SLOT, groups.shape[0] - 1)])
    fused = keys.index_select(-1, groups[0])  # [L, d/G]
    for slot in groups[1:]:
        fused += keys.index_select(-1, slot)
    return fused
