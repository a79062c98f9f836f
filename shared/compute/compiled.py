"""Numerics `compiled`: fast numerics, with one-row steps run by kernels TorchInductor compiles (CPU only).

A micro-batch of one row (one request decoding under plain PP, or a SpecPipe level of one node) is a chain of
matrix-vector products. On a CPU these read every weight once and should run at the core's memory bandwidth.
They do not, on the AMD EPYC (Zen 4) this was measured on, one thread, fp32 smollm2-135m:
- oneDNN's packed products and MKL's sgemv read 10-13 GB/s of weights, while a plain streaming sum reads 29 GB/s;
- the layer's two dozen small element-wise ops (norms, RoPE, SiLU, residuals) add about a quarter again in
  dispatch.

Here each product is a reduction over the weight's rows (`gemv`), which Inductor's C++ backend vectorises into one
pass over the weight. A layer becomes two compiled calls, before and after attention, with the norms, RoPE and
the MLP's gate fused in. Attention and the KV writes stay eager (they index per-request caches).
- Measured: smollm2-135m's first stage of two (19 layers, a 300-token context), one row, went from 25 to 19.5 ms a
  forward (BENCHMARKS.md, session 19).
- Rows of more than one keep the fast path (oneDNN): Inductor's reduction there re-reads the weight per row.

The math is model.py's own (`attention_inputs`, `attention_output_and_mlp`, `lm_logits`), traced with `gemv`
as the product. Only the kernels and their summation order differ from fast numerics, so a token can differ
from plain decoding only at a rounding near-tie, as in fast numerics.

Precedent: vLLM v1 compiles its model with torch.compile by default; SGLang's `--enable-torch-compile` is opt-in.
Compiling costs time at start: about 18 s in a fresh process with an empty Inductor cache
(/tmp/torchinductor_$USER), about 3 s once the cache holds the kernels. It happens when the runner is built, not
at the first request. So this is opt-in too (`--numerics compiled`), and the services' default stays fast.
"""

from __future__ import annotations

import torch

from shared.compute.model import LayerWeights, attention_inputs, attention_output_and_mlp, lm_logits
from shared.compute.weights import StageWeights
from shared.types.config import ModelArch
from shared.types.errors import ConfigError


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b for one row, as a reduction over w's rows (one pass over w once compiled).
    x: [1, in]; w: [out, in] -> [1, out]."""
    out = (w * x).sum(-1)[None]  # [1, out]
    return out if b is None else out + b


def _attention_inputs(x, w, arch, cos, sin):
    return attention_inputs(x, w, arch, cos, sin, gemv)


def _attention_output_and_mlp(x, attended, w, arch):
    return attention_output_and_mlp(x, attended, w, arch, gemv)


def _logits(x, final_norm, lm_head, arch):
    return lm_logits(x, final_norm, lm_head, arch, gemv)


class OneRowKernels:
    """A stage's one-row layer and LM head, compiled when built (a warm-up call on the stage's own shapes)."""

    def __init__(self, arch: ModelArch, weights: StageWeights):
        self.arch = arch
        compile_ = {"dynamic": False, "fullgraph": True}  # one row: static shapes, one graph per weight shape
        self._inputs = torch.compile(_attention_inputs, **compile_)
        self._rest = torch.compile(_attention_output_and_mlp, **compile_)
        self._logits = torch.compile(_logits, **compile_)
        try:
            self._warm_up(weights)
        except Exception as exc:  # Inductor needs a C++ compiler; say so at start, not at the first request
            raise ConfigError(f"numerics compiled: TorchInductor could not compile this stage's kernels ({exc}); "
                              "use numerics fast") from exc

    def layer(self, x: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, write_kv, attend
              ) -> torch.Tensor:
        """model.decoder_layer for one row. x: [1, H]; cos/sin: [1, d]."""
        q, k, v = self._inputs(x, w, self.arch, cos, sin)  # [1, h, d], [1, g, d], [1, g, d]
        write_kv(k, v)
        return self._rest(x, attend(q), w, self.arch)

    def logits(self, x: torch.Tensor, final_norm: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """model.lm_logits for one row: [1, H] -> [1, V]."""
        return self._logits(x, final_norm, lm_head, self.arch)

    def _warm_up(self, weights: StageWeights) -> None:
        a, w = self.arch, weights.layers[0]
        x = w.qkv.new_zeros(1, a.hidden_size)  # [1, H]
        rope = w.qkv.new_zeros(1, a.head_dim)  # [1, d]
        self.layer(x, w, rope, rope, lambda k, v: None, lambda q: q.reshape(1, -1))
        if weights.lm_head is not None:
            self.logits(x, weights.final_norm, weights.lm_head)
