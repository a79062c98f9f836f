"""DistrAttention: self-attention with a narrower Q·Kᵀ, for long prefills.

DistrAttention (Jin, Xiao, Yuan et al., 2025) keeps the whole context but
shrinks the inner dimension d of the score product: for each block of l query
rows and each head, Q's d columns are hashed, sorted and cut into d / G groups,
and Q·Kᵀ becomes Q'·K'ᵀ with one fused column per group
(shared/compute/distr_groups.py; docs/distrattention.md compares every choice
with the authors' code). Softmax and P·V stay exact at full width, with scale
1/sqrt(d). Query row i sits at position q_offset + i; with causal masking it
attends keys 0 .. q_offset + i.

Two forms here, equal up to rounding:
- distr_attention_reference: each block's whole score matrix at once, readable;
- distr_attention: the CPU path the runner takes. Per (query block, head) one
  gather-and-sum builds K' [L, d/G] in that block's grouping, then each sub-block
  of `sub_rows` rows is one Q'·K'ᵀ matmul into a reused score buffer, a softmax
  into a second one and one P·V matmul; nothing is allocated per step.
The CUDA form is shared/compute/distr_triton.py.

Notation: n = query rows, h = query heads, g = kv heads, r = h // g (GQA: query
head j uses kv head j // r), d = head dim, G = group size, l = block rows,
m = rows of one block (l, or fewer for the last), L = keys.
"""

from __future__ import annotations

import torch

from shared.compute.distr_groups import column_groups, fuse_keys, fuse_queries
from shared.types.config import AttentionConfig

SUB_ROWS = 64  # query rows per score matmul in distr_attention: a [64, 16k] fp32 score buffer is 4 MiB


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, causal: bool, q_offset: int
) -> None:
    """Shapes must fit ([n, h, d] against [L, g, d] with g dividing h) and causal queries need their keys."""
    (n, h, d), (length, g, _) = q.shape, k.shape
    if k.shape != v.shape or k.shape[-1] != d or h % g:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q_offset + n > length:
        raise ValueError(f"causal queries reach position {q_offset + n - 1} but there are only {length} keys")
    cfg.check_head_dim(d)


def causal_mask(q_start: int, rows: int, k_start: int, keys: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """True where key position > query position. -> [rows, keys]."""
    query_pos = torch.arange(q_start, q_start + rows, device=device)[:, None]
    key_pos = torch.arange(k_start, k_start + keys, device=device)[None, :]
    return key_pos > query_pos


def distr_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, causal: bool = True, q_offset: int = 0
) -> torch.Tensor:
    """Untiled DistrAttention: each query block's whole score matrix at once (the readable reference).

    q: [n, h, d]; k, v: [L, g, d] -> [n, h, d].
    """
    check_inputs(q, k, v, cfg, causal, q_offset)
    (n, h, d), l = q.shape, cfg.block_rows
    r = h // k.shape[1]
    keys = k.transpose(0, 1).repeat_interleave(r, 0)  # [h, L, d]
    values = v.transpose(0, 1).repeat_interleave(r, 0)  # [h, L, d]
    groups = column_groups(q, cfg)  # [nb, h, G, d/G]
    out = torch.empty_like(q)
    for block, start in enumerate(range(0, n, l)):
        q_block = q[start : start + l].transpose(0, 1)  # [h, m, d]
        q_fused = fuse_queries(q_block, groups[block], cfg.fuse)  # [h, m, d/G]
        k_fused = torch.stack([fuse_keys(keys[j], groups[block, j], cfg.fuse) for j in range(h)])  # [h, L, d/G]
        scores = q_fused @ k_fused.transpose(-1, -2) * d**-0.5  # [h, m, L]
        if causal:
            later = causal_mask(q_offset + start, q_block.shape[1], 0, k.shape[0], q.device)  # [m, L]
            scores = scores.masked_fill(later, float("-inf"))
        out[start : start + l] = (torch.softmax(scores, dim=-1) @ values).transpose(0, 1)  # [m, h, d]
    return out


def distr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    causal: bool = True,
    q_offset: int = 0,
    sub_rows: int = SUB_ROWS,
) -> torch.Tensor:
    """DistrAttention by matmuls on reused buffers (the CPU path). q: [n, h, d]; k, v: [L, g, d] -> [n, h, d].

    Equals distr_attention_reference up to rounding. Memory: K and V once more
    head-major, and two [sub_rows, L] score buffers.
    """
    check_inputs(q, k, v, cfg, causal, q_offset)
    if sub_rows < 1:
        raise ValueError("sub_rows must be >= 1")
    (n, h, d), (length, g, _), l = q.shape, k.shape, cfg.block_rows
    keys, values = (x.permute(1, 0, 2).contiguous() for x in (k, v))  # [g, L, d] each
    groups = column_groups(q, cfg)  # [nb, h, G, d/G]
    out = torch.empty(h, n, d, dtype=q.dtype, device=q.device)
    buffers = torch.empty(2, sub_rows * length, dtype=q.dtype, device=q.device)  # scores, probabilities
    diagonal = torch.full((sub_rows, sub_rows), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    for block, start in enumerate(range(0, n, l)):
        q_block = q[start : start + l].transpose(0, 1)  # [h, m, d]
        q_fused = fuse_queries(q_block, groups[block], cfg.fuse) * d**-0.5  # [h, m, d/G]
        block_keys = q_offset + start + q_block.shape[1] if causal else length  # keys [0, block_keys) are seen
        for j in range(h):
            k_fused = fuse_keys(keys[j // (h // g), :block_keys], groups[block, j], cfg.fuse)  # [block_keys, d/G]
            for s in range(0, q_block.shape[1], sub_rows):
                rows = min(sub_rows, q_block.shape[1] - s)
                seen = q_offset + start + s + rows if causal else length  # keys [0, seen) reach these rows
                scores = buffers[0, : rows * seen].view(rows, seen)
                torch.mm(q_fused[j, s : s + rows], k_fused[:seen].T, out=scores)
                if causal:  # the last `rows` keys are the rows' own positions: mask above the diagonal
                    scores[:, seen - rows :] += diagonal[:rows, :rows]
                probs = torch.ops.aten._softmax.out(scores, -1, False, out=buffers[1, : rows * seen].view(rows, seen))
                torch.mm(probs, values[j // (h // g), :seen], out=out[j, start + s : start + s + rows])
    return out.transpose(0, 1).contiguous()
