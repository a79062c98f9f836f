"""A compact Llama-family decoder (Llama, Qwen2, SmolLM2), written for trees.

In the spirit of gpt-fast's model.py, with its numerics modes on one code path.

Numerics `exact` keeps every operation *row invariant*: a node's hidden state
does not depend on which other nodes share its micro-batch. That is what lets
a speculative tree reproduce plain decoding bit for bit:
- GEMMs: a BLAS picks its kernel and K blocking by the row count, so a row
  must be computed by a product whose shape does not depend on the batch.
  Generated rows (tree nodes, decode rows) are each a one-row product
  (`rowwise_linear`: one batched GEMV over the rows, the BLAS's fastest kernel
  for one row, and bit-identical to a lone row on the machines we checked).
  Prompt rows, at positions below the prompt length and so alike in every
  policy, go in PROMPT_ROW_TILE-row tiles (`linear`).
  tests/shared/compute/test_invariance.py checks this on the machine at hand.
- Attention: a generated row attends to its context gathered in position order
  (prefix, ancestors, itself) with its own fixed-shape matmuls; prompt rows
  attend in position-aligned tiles of PROMPT_ROW_TILE queries with one masked
  SDPA call per tile (`prompt_tile_attention`), whose shapes depend only on the
  tile, however the prompt was chunked.
- RoPE: one precomputed table indexed by position.

Numerics `fast` gives up row invariance for speed: one GEMM per micro-batch and
one masked SDPA call per request and layer (`masked_attention`). Every token is
still the target's own choice from logits computed for exactly its context;
tokens can differ from plain decoding only where rounding flips a near-tie.

Numerics `compiled` is fast numerics with micro-batches of one or two rows run
by TorchInductor: the same functions (`attention_inputs`,
`attention_output_and_mlp`, `lm_logits`) traced with a one-pass product
(shared/compute/compiled.py).

Notation: n = rows in the micro-batch, H = hidden size, h = query heads,
g = kv heads, r = h // g, d = head dim, L = context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.types.config import ModelArch

PROMPT_ROW_TILE = 64  # prompt rows' GEMM and attention tiles (positions below the prompt length)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, tile: int = PROMPT_ROW_TILE) -> torch.Tensor:
    """x @ w.T + b in GEMMs of exactly `tile` rows, the last one zero-padded: each row is computed the same way
    whatever the row count. x: [n, in] -> [n, out]."""
    n, t = x.shape[0], tile
    padded = -(-n // t) * t
    if padded != n:
        x = F.pad(x, (0, 0, 0, padded - n))  # [padded, in]
    if padded == t:
        return F.linear(x, w, b)[:n]
    return torch.cat([F.linear(x[i : i + t], w, b) for i in range(0, padded, t)])[:n]


def rowwise_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b, every row its own one-row product: one batched GEMV (the weight broadcast, not copied).
    x: [n, in] -> [n, out]."""
    n, k = x.shape
    out = torch.bmm(x[:, None, :], w.t().expand(n, k, w.shape[0]))[:, 0]  # [n, out]
    return out if b is None else out + b


def tiled_linear(groups: list[tuple[torch.Tensor, object]]):
    """The exact GEMM for a micro-batch whose rows fall in groups of one product each: [(row indices, gemm)].
    A row's group must not depend on the batch (prompt rows and generated rows, say)."""

    def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[0])  # [n, out]
        for rows, gemm in groups:
            out[rows] = gemm(x[rows], w, b)
        return out

    return lin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)  # [n, 1]
    return weight * (x * torch.rsqrt(variance + eps))


def rope_frequencies(arch: ModelArch) -> torch.Tensor:
    """inv_freq: [d/2], scaled as Llama 3 does when the model says so."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # [d/2]
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_positions / s.low_freq_factor  # longer: slowed down by `factor`
    high_wavelen = s.original_max_positions / s.high_freq_factor  # shorter: kept
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(arch: ModelArch, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, d], the Hugging Face (rotate-half) convention."""
    inv_freq = rope_frequencies(arch)  # [d/2]
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq  # [P, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [n, heads, d]; cos/sin: [n, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class LayerWeights:
    """One decoder layer; q/k/v and gate/up are fused into single GEMMs."""

    qkv: torch.Tensor  # [(h + 2g) * d, H]
    qkv_bias: torch.Tensor | None  # [(h + 2g) * d]
    o: torch.Tensor  # [H, h * d]
    gate_up: torch.Tensor  # [2 * I, H]
    down: torch.Tensor  # [H, I]
    attn_norm: torch.Tensor  # [H]
    mlp_norm: torch.Tensor  # [H]


@dataclass
class RowAttention:
    """One row's attention context in its request's cache."""

    row: int  # index in the micro-batch
    context: torch.Tensor | None  # [L] cache slots in position order, or None for the slice [0, L)
    length: int


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: list[RowAttention],
    arch: ModelArch,
    out: torch.Tensor,
) -> None:
    """Tree attention of one request's rows. q: [n, h, d]; k/v_cache: [capacity, g, d]; out: [n, g, r, d]."""
    g, r, d = arch.num_kv_heads, arch.rep, arch.head_dim
    scale = d**-0.5
    for row in rows:
        if row.context is None:
            keys, values = k_cache[: row.length], v_cache[: row.length]  # [L, g, d]
        else:
            keys, values = k_cache[row.context], v_cache[row.context]  # gathered: [L, g, d]
        scores = torch.matmul(q[row.row].view(g, r, d), keys.permute(1, 2, 0)) * scale  # [g, r, L]
        probs = torch.softmax(scores, dim=-1)
        out[row.row] = torch.matmul(probs, values.permute(1, 0, 2))  # [g, r, d]


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """One request's rows in one SDPA call. q: [m, h, d]; keys/values: [L, g, d] (the cache's first L slots);
    mask: [m, L], True where the row attends, or None: every row attends to all L. Returns [m, h, d]. Grouped-query attention without copying K/V
    (SDPA's enable_gqa expands them on the CPU): the r query heads of a kv head become r * m query rows of it."""
    m, h, d = q.shape
    g = keys.shape[1]
    r = h // g
    grouped = q.view(m, g, r, d).permute(1, 2, 0, 3).reshape(g, r * m, d)  # [g, r*m, d]: rows (head in group, row)
    out = F.scaled_dot_product_attention(
        grouped[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],  # [1, g, r*m | L, d]
        attn_mask=None if mask is None else mask.repeat(r, 1)[None, None],  # [1, 1, r*m, L]
    )  # [1, g, r*m, d]
    return out[0].view(g, r, m, d).permute(2, 0, 1, 3).reshape(m, h, d)


def prompt_tile_attention(q: torch.Tensor, positions: list[int], keys: torch.Tensor, values: torch.Tensor,
                          tile: int = PROMPT_ROW_TILE) -> torch.Tensor:
    """Prompt rows (numerics exact), causal, in position-aligned tiles: the row at position p is query p % tile
    of tile t = p // tile, attending keys [0, (t + 1) * tile) under a causal mask. A tile's shapes depend only on
    t, so a row's numbers do not depend on which chunk brought it. q: [m, h, d]; positions: the rows' positions
    (their prefix slots); keys/values: [C, g, d] the request's cache. Returns [m, h, d]."""
    out = torch.empty_like(q)
    by_tile: dict[int, list[int]] = {}
    for i, p in enumerate(positions):
        by_tile.setdefault(p // tile, []).append(i)
    for t, rows in by_tile.items():
        end, offset = (t + 1) * tile, t * tile
        sel = torch.tensor(rows, device=q.device)  # [s] rows in this tile
        at = torch.tensor([positions[i] - offset for i in rows], device=q.device)  # [s] their query slots
        tile_q = q.new_zeros(tile, *q.shape[1:])  # [tile, h, d]; rows of other chunks stay zero
        tile_q[at] = q[sel]
        k, v = keys[:end], values[:end]
        if k.shape[0] < end:  # the cache ends inside the tile: pad to the tile's shape (masked anyway)
            k, v = F.pad(k, (0, 0, 0, 0, 0, end - k.shape[0])), F.pad(v, (0, 0, 0, 0, 0, end - v.shape[0]))
        mask = torch.ones(tile, end, dtype=torch.bool, device=q.device).tril(offset)  # [tile, end]: key <= query
        out[sel] = masked_attention(tile_q, k, v, mask)[at]
    return out


def attention_inputs(x: torch.Tensor, w: LayerWeights, arch: ModelArch, cos: torch.Tensor, sin: torch.Tensor,
                     lin=rowwise_linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer up to its attention: norm, the fused q/k/v product, RoPE. x: [n, H]; cos/sin: [n, d]
    -> q: [n, h, d], k and v: [n, g, d]."""
    n, h, g, d = x.shape[0], arch.num_heads, arch.num_kv_heads, arch.head_dim
    qkv = lin(rms_norm(x, w.attn_norm, arch.rms_eps), w.qkv, w.qkv_bias)  # [n, (h + 2g) * d]
    qk = apply_rope(qkv[:, : (h + g) * d].reshape(n, h + g, d), cos, sin)  # [n, h + g, d]: one rotation for both
    q, k = qk.split([h, g], dim=1)
    return q, k, qkv[:, (h + g) * d :].reshape(n, g, d)


def attention_output_and_mlp(x: torch.Tensor, attended: torch.Tensor, w: LayerWeights, arch: ModelArch,
                             lin=rowwise_linear) -> torch.Tensor:
    """The rest of a layer: the output product and residual, then the MLP and its residual. x: [n, H] the layer's
    input; attended: [n, h * d] -> [n, H]."""
    x = x + lin(attended, w.o)
    gate, up = lin(rms_norm(x, w.mlp_norm, arch.rms_eps), w.gate_up).chunk(2, dim=-1)  # [n, I] each
    return x + lin(F.silu(gate) * up, w.down)


def lm_logits(x: torch.Tensor, final_norm: torch.Tensor, lm_head: torch.Tensor, arch: ModelArch,
              lin=rowwise_linear) -> torch.Tensor:
    """Final norm and LM head: hidden states [n, H] -> logits [n, V]."""
    return lin(rms_norm(x, final_norm, arch.rms_eps), lm_head)


def decoder_layer(
    x: torch.Tensor,
    w: LayerWeights,
    arch: ModelArch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write_kv,
    attend,
    lin=rowwise_linear,
) -> torch.Tensor:
    """One pre-norm decoder layer. x: [n, H]; cos/sin: [n, d].

    write_kv(k, v) stores the rows' keys/values ([n, g, d]) in the cache;
    attend(q) runs tree attention for q: [n, h, d] and returns [n, h * d];
    lin is the GEMM (row invariant for numerics exact, F.linear for fast).
    """
    q, k, v = attention_inputs(x, w, arch, cos, sin, lin)
    write_kv(k, v)
    return attention_output_and_mlp(x, attend(q), w, arch, lin)
