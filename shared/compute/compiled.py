"""Numerics `compiled`: fast numerics, with few-row steps run by kernels TorchInductor compiles (CPU only).

A micro-batch of one or two rows (one request decoding under plain PP, or a SpecPipe level of one or two nodes)
is a chain of matrix-vector products. On a CPU these read every weight once and should run at the core's memory
bandwidth. They do not, on the AMD EPYC (Zen 4) this was measured on, one thread, fp32 smollm2-135m:
- oneDNN's packed products and MKL's sgemv read 10-13 GB/s of weights, while a plain streaming sum reads 21-29 GB/s;
- the layer's two dozen small element-wise ops (norms, RoPE, SiLU, residuals) add about a quarter again in
  dispatch.

Here each product is, per row, a reduction over the weight's rows (`gemv`); Inductor's C++ backend vectorises
them and fuses a micro-batch's rows into one pass over the weight. A layer becomes two compiled calls, before
and after attention, with the norms, RoPE and the MLP's gate fused in. Attention and the KV writes stay eager
(they index per-request caches).
- Measured (BENCHMARKS.md, session 19): smollm2-135m's first stage of two (19 layers, a 300-token context),
  one thread: one row 25-34 ms a forward in fast numerics, 18-20 compiled; two rows 29-31 against 25-28.
  Session 22 (600-token context, per row count's options, ROW_FLAGS): first stage one row 12.3-12.8 ms, two
  rows 15.7-16.1; last stage 10.4-10.6 and 13.4-13.9.
- Micro-batches of more than MAX_ROWS rows keep fast numerics' products (oneDNN): from three rows on, Inductor's
  kernels were slower than oneDNN's packed ones (session 22: 32 against 17 ms a first-stage forward of three
  rows; they recompute the norms inside the products' loops), and each row count is one more graph to compile.

The math is model.py's own (`attention_inputs`, `attention_output_and_mlp`, `lm_logits`), traced with `gemv`
as the product. Only the kernels, their summation order and their fused multiply-adds (one rounding where two
were: FMA) differ from fast numerics, so a token can differ from plain decoding only at a rounding
near-tie, as in fast numerics.

Precedent: vLLM v1 compiles its model with torch.compile by default; SGLang's `--enable-torch-compile` is opt-in.
Compiling costs time at start: about 18 s in a fresh process with an empty Inductor cache
(/tmp/torchinductor_$USER), a few seconds once the cache holds the kernels. It happens when the runner is built,
not at the first request. So this is opt-in too (`--numerics compiled`), and the services' default stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from shared.compute.model import LayerWeights, attention_inputs, attention_output_and_mlp, lm_logits
from shared.compute.weights import StageWeights
from shared.types.config import ModelArch
from shared.types.errors import ConfigError

# The C++ compiler may fuse a multiply and the add after it into one FMA (one rounding, not two). Without it each
# row's reduction is a chain of dependent adds: on the AMD EPYC (Zen 4) measured, the first stage's two-row forward
# cost 17% more than its one-row forward without it, 11% with it (BENCHMARKS.md, issue 15 session 22).
FMA = {"cpp.enable_floating_point_contract_flag": "fast"}
# Inductor's options per row count; micro-batches of up to MAX_ROWS rows take the compiled kernels. One row also
# computes every element-wise result before the product that reads it (realize_opcount_threshold 0): Inductor
# otherwise recomputes, say, the final norm's square root inside the LM head's loop, for every weight read. It
# made one-row stage forwards 10-12% faster and two-row ones 13-33% slower on that EPYC, so two rows keep the
# default.
ROW_FLAGS = {1: {**FMA, "realize_opcount_threshold": 0}, 2: FMA}
MAX_ROWS = max(ROW_FLAGS)
RECOMPILE_LIMIT = 64  # graphs Dynamo keeps per compiled function (FewRowKernels)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b for a few rows: per row a reduction over w's rows, which Inductor fuses into one pass over w
    (the row count is a constant of the traced graph). x: [n, in]; w: [out, in] -> [n, out]."""
    out = torch.stack([(w * row).sum(-1) for row in x.unbind(0)])  # [n, out]
    return out if b is None else out + b


def _attention_inputs(x, w, arch, cos, sin):
    return attention_inputs(x, w, arch, cos, sin, gemv)


def _attention_output_and_mlp(x, attended, w, arch):
    return attention_output_and_mlp(x, attended, w, arch, gemv)


def _logits(x, final_norm, lm_head, arch):
    return lm_logits(x, final_norm, lm_head, arch, gemv)


class _Kernels(NamedTuple):
    """One row count's compiled functions."""

    inputs: Callable
    rest: Callable
    logits: Callable


class FewRowKernels:
    """A stage's layer and LM head for micro-batches of up to MAX_ROWS rows, compiled when built (warm-up calls
    on the stage's own shapes, one per row count)."""

    def __init__(self, arch: ModelArch, weights: StageWeights):
        self.arch = arch
        # Every runner compiles these same functions, and Dynamo keeps their graphs per function: a graph per row
        # count per model, arch or dtype loaded in this process (a target and a draft, tests' several models), against
        # a default limit of 8 past which a fullgraph call raises. The limit is process-wide: raised, never lowered.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # static shapes: one graph per row count, each with its row count's options (ROW_FLAGS)
        self._kernels = {n: _Kernels(*(torch.compile(fn, dynamic=False, fullgraph=True, options=flags)
                                       for fn in (_attention_inputs, _attention_output_and_mlp, _logits)))
                         for n, flags in ROW_FLAGS.items()}
        try:
            self._warm_up(weights)
        except Exception as exc:  # Inductor needs a C++ compiler; say so at start, not at the first request
            raise ConfigError(f"numerics compiled: TorchInductor could not compile this stage's kernels ({exc}); "
                              "use numerics fast") from exc

    def layer(self, x: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, write_kv, attend
              ) -> torch.Tensor:
        """model.decoder_layer for up to MAX_ROWS rows. x: [n, H]; cos/sin: [n, d]. Without autograd whatever
        the caller's grad mode: the graphs are guarded on it, and one mode keeps them to those the warm-up made."""
        with torch.no_grad():
            kernels = self._kernels[x.shape[0]]
            q, k, v = kernels.inputs(x, w, self.arch, cos, sin)  # [n, h, d], [n, g, d], [n, g, d]
            write_kv(k, v)
            return kernels.rest(x, attend(q), w, self.arch)

    def logits(self, x: torch.Tensor, final_norm: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """model.lm_logits for up to MAX_ROWS rows: [n, H] -> [n, V]."""
        with torch.no_grad():
            return self._kernels[x.shape[0]].logits(x, final_norm, lm_head, self.arch)

    def _warm_up(self, weights: StageWeights) -> None:
        """Each graph built once, on inputs shaped, strided and aliased as a forward's are (Dynamo guards on all
        three: cos and sin one tensor, say, would be a graph of its own)."""
        a, w = self.arch, weights.layers[0]
        for n in range(1, MAX_ROWS + 1):  # one graph per row count
            x = w.qkv.new_zeros(n, a.hidden_size)  # [n, H]
            cos, sin = w.qkv.new_zeros(n, a.head_dim), w.qkv.new_zeros(n, a.head_dim)  # [n, d] each
            self.layer(x, w, cos, sin, lambda k, v: None, lambda q: q.new_zeros(n, a.num_heads * a.head_dim))
            if weights.lm_head is not None:
                self.logits(x, weights.final_norm, weights.lm_head)
