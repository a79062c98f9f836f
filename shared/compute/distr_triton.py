"""DistrAttention as one Triton kernel (CUDA; on CPU under Triton's interpreter, for tests).

FlashAttention-2 style, after the authors' `_fwd_kernel_flash_2_64` ([A2] in docs/distrattention.md) with its
`IS_CAUSAL` branch on: one program per (query block, query head). It fuses the block's Q' [l, d/G] once from the
column groups, then for every key tile of BLOCK_N keys up to the block's last visible key it gathers and fuses
K' [BLOCK_N, d/G] with the same groups, scores Q'·K'ᵀ (scale 1/sqrt(d), the full head dim), masks causally,
updates the online softmax and adds P·V at full width d. The groups come from
shared/compute/distr_groups.column_groups (torch on the same device: SimHash, Gray code, argsort), which the CPU
reference uses too, so kernel and reference fuse the same columns; the authors hash in a second Triton kernel.
Inputs are the runner's layout: q [n, h, d], k, v [L, g, d] (GQA: query head j reads kv head j // (h // g)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shared.compute.distr_attention import check_inputs
from shared.compute.distr_groups import KEY_SLOT, column_groups
from shared.types.config import AttentionConfig

BLOCK_KEYS = 64  # the authors' BLOCK_N in every kernel


@triton.jit
def distr_attention_fwd(
    Q, K, V, Groups, Out, sm_scale, n, length, q_offset, heads, rep,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    D: tl.constexpr, DG: tl.constexpr, G: tl.constexpr, SUM_ONE: tl.constexpr, SLOT: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // rep
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows
    row_ok = rows < n
    fused, full = tl.arange(0, DG), tl.arange(0, D)
    groups = Groups + (block * heads + head) * G * DG  # this block's and head's [G, DG] column indices

    q_fused = tl.zeros([BLOCK_M, DG], dtype=tl.float32)  # Q': mean (mean_sum) or sum (sum_one) of each group
    for t in tl.static_range(G):
        cols = tl.load(groups + t * DG + fused)  # [DG]
        q_ptrs = Q + rows[:, None] * stride_qn + head * stride_qh + cols[None, :]
        q_fused += tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_fused = (q_fused * (sm_scale if SUM_ONE else sm_scale / G)).to(Q.dtype.element_ty)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    end = tl.minimum(length, q_offset + (block + 1) * BLOCK_M) if CAUSAL else length  # keys [0, end) are seen
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_ok = keys < end
        k_fused = tl.zeros([BLOCK_N, DG], dtype=tl.float32)  # K': sum of each group, or its column in SLOT
        for t in tl.static_range(G):
            if (not SUM_ONE) or t == SLOT:
                cols = tl.load(groups + t * DG + fused)
                k_ptrs = K + keys[:, None] * stride_kn + kv_head * stride_kh + cols[None, :]
                k_fused += tl.load(k_ptrs, mask=key_ok[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q_fused, tl.trans(k_fused.to(K.dtype.element_ty)))  # [BLOCK_M, BLOCK_N]
        seen = key_ok[None, :]
        if CAUSAL:
            seen = seen & (keys[None, :] <= (q_offset + rows)[:, None])
        scores = tl.where(seen, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))  # finite from the first tile: key 0 is seen by every row
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        v_ptrs = V + keys[:, None] * stride_vn + kv_head * stride_vh + full[None, :]
        values = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
        acc = acc * correction[:, None] + tl.dot(probs.to(values.dtype), values)
        row_max = new_max
    out_ptrs = Out + rows[:, None] * stride_on + head * stride_oh + full[None, :]
    tl.store(out_ptrs, (acc / row_sum[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])


def _check_tiles(d: int, cfg: AttentionConfig, block_keys: int) -> None:
    """tl.arange needs powers of two, tl.dot inner and outer sizes of at least 16."""
    sizes = {"head dim": d, "block_rows": cfg.block_rows, "d / group_size": d // cfg.group_size,
             "block_keys": block_keys}
    bad = [f"{name} {size}" for name, size in sizes.items() if size < 16 or size & (size - 1)]
    if bad:
        raise ValueError(f"the Triton kernel needs powers of two >= 16: {', '.join(bad)}")


def distr_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    causal: bool = True,
    q_offset: int = 0,
    block_keys: int = BLOCK_KEYS,
) -> torch.Tensor:
    """DistrAttention in one kernel launch. q: [n, h, d]; k, v: [L, g, d] (last dim contiguous) -> [n, h, d].

    On CUDA tensors; on CPU tensors when Triton runs its interpreter (TRITON_INTERPRET=1 in the environment
    before triton is first imported: Triton reads it when it jits, at import).
    """
    check_inputs(q, k, v, cfg, causal, q_offset)
    (n, h, d), (length, g, _), G = q.shape, k.shape, cfg.group_size
    _check_tiles(d, cfg, block_keys)
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k and v need a contiguous last dimension")
    groups = column_groups(q, cfg).to(torch.int32).contiguous()  # [nb, h, G, d/G]
    out = torch.empty_like(q)
    grid = (groups.shape[0], h)
    distr_attention_fwd[grid](
        q, k, v, groups, out, d**-0.5, n, length, q_offset, h, h // g,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D=d, DG=d // G, G=G, SUM_ONE=cfg.fuse == "sum_one", SLOT=min(KEY_SLOT, G - 1), CAUSAL=causal,
        BLOCK_M=cfg.block_rows, BLOCK_N=block_keys, num_warps=4 if d <= 64 else 8, num_stages=2,
    )
    return out
