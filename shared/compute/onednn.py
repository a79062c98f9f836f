"""Numerics fast on a CPU: every GEMM through oneDNN, with the weights packed once at load.

PyTorch's F.linear goes to MKL's sgemm, whose small-M kernels are slow on some
CPUs: on this AMD EPYC (AVX2) a 4-row product of a Qwen2.5-1.5B MLP weight
takes 4x a 1-row one, so speculative rows cost nearly as much as whole steps.
oneDNN with a pre-packed weight (the path PyTorch Inductor's CPU freezing uses:
torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise) keeps 1-8 rows
within 1.0-1.6x of one row there (`python /tmp/gemm4.py`-style scan in
BENCHMARKS.md). Numerics exact never comes here: its products must keep fixed
shapes and kernels.

The packed copies sit beside the weights (twice the GEMM weights' memory, CPU
and numerics fast only). Where oneDNN is missing or cannot pack the dtype (bf16
needs AVX512-BF16 or AVX-NE-CONVERT), `onednn_linear` returns None and the
runner keeps F.linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shared.compute.weights import StageWeights

# Products of fewer rows are padded to this many. On this AMD EPYC (AVX2), one thread, smollm2-135m's weights:
# 1 row 37-43 ms a token, 4 rows 30-31 ms (2 rows 1.4x 4 rows'); at 2 threads 1 and 4 rows are level. A decode
# step is one row per request, so single-row products are what one request's latency rides on.
MIN_ROWS = 4


def onednn_linear(weights: StageWeights) -> Callable | None:
    """lin(x, w, b) over this stage's weight matrices through oneDNN packed copies, or None where it can't."""
    if not torch.backends.mkldnn.is_available():
        return None
    matrices = [m for layer in weights.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    matrices += [weights.lm_head] if weights.lm_head is not None else []
    try:
        packed = {id(m): torch.ops.mkldnn._reorder_linear_weight(m, None) for m in matrices}
    except RuntimeError:  # this CPU's oneDNN cannot pack the dtype
        return None

    def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n < MIN_ROWS:  # zero rows up to MIN_ROWS: oneDNN's kernel for 4 rows beats its 1-3-row one
            x = torch.cat([x, x.new_zeros(MIN_ROWS - n, x.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed[id(w)], b, "none", [], "")[:n]  # [n, out]

    return lin
