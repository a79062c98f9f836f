"""torch's FlexAttention on the CPU, as a bound on what it could do for DistrAttention (benchmarks.distr_speed --flex).

FlexAttention (torch.nn.attention.flex_attention, compiled by torch.compile into inductor's C++ flex template)
accepts a V head dim other than Q's and K's, so it can run Q'·K'ᵀ at width d/G with P·V at width d in one
fused kernel. DistrAttention needs a K' per query block (each block has its own grouping); two timings bound
what any FlexAttention form of it can reach:
- flex_full: q, k, v at width d, causal block mask: the kernel's own speed against SDPA's CPU flash kernel;
- flex_narrow: q and k at width d/G with v at width d, one K' shared by every block: the method's narrower
  product with none of its per-block work (hashing, and K' per block), so a lower bound on its time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _causal(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_timers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> dict[str, Callable]:
    """Callables for flex_full and flex_narrow (compiled on their first call). q, k, v: [L, h, d] (MHA)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # each (L, d) compiles afresh: no recompile limit across a sweep
    compiled = torch.compile(flex_attention, dynamic=False)
    length, d = q.shape[0], q.shape[-1]
    q4, k4, v4 = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))  # [1, h, L, d]
    narrow_q, narrow_k = (x[..., : d // group_size].contiguous() for x in (q4, k4))  # [1, h, L, d/G]
    mask = create_block_mask(_causal, None, None, length, length, device=q.device)
    return {
        "flex_full": lambda: compiled(q4, k4, v4, block_mask=mask),
        "flex_narrow": lambda: compiled(narrow_q, narrow_k, v4, block_mask=mask, scale=d**-0.5),
    }
