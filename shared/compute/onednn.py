"""Numerics fast on a CPU: GEMMs through oneDNN, with the weights packed once at load (few-row ones on Intel: MKL).

PyTorch's F.linear goes to MKL's sgemm, whose small-M kernels are slow on some
CPUs: on this AMD EPYC (AVX2) a 4-row product of a Qwen2.5-1.5B MLP weight
takes 4x a 1-row one, so speculative rows cost nearly as much as whole steps.
oneDNN with a pre-packed weight (the path PyTorch Inductor's CPU freezing uses:
torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise) keeps 1-8 rows
within 1.0-1.6x of one row there (`python /tmp/gemm4.py`-style scan in
BENCHMARKS.md). Numerics exact never comes here: its products must keep fixed
shapes and kernels.

On Intel CPUs MKL's products of up to three rows are the faster ones, measured
in whole forwards (the note at INTEL_MKL_ROWS): they go to F.linear there
(`mkl_rows`). A row's numbers then depend on the row count (1-3 against 4 or
more), as fast numerics allows: rounding, not the function.

The packed copies sit beside the weights (twice the GEMM weights' memory, CPU
and numerics fast only). Where oneDNN is missing or cannot pack the dtype (bf16
needs AVX512-BF16 or AVX-NE-CONVERT), `onednn_linear` returns None and the
runner keeps F.linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from shared.compute.weights import StageWeights

# Products of fewer rows (more than mkl_rows(): on AMD, all) are padded to this many. On this AMD EPYC (AVX2), one
# thread, smollm2-135m's weights: 1 row 37-43 ms a token, 4 rows 30-31 ms (2 rows 1.4x 4 rows'); at 2 threads 1 and
# 4 rows are level. A decode step is one row per request, so single-row products are what one request's latency
# rides on.
MIN_ROWS = 4
# Products of up to this many rows go to F.linear (MKL's sgemm) on an Intel CPU. On an Intel Xeon (AVX-512), one
# thread, smollm2-135m's first stage of two (19 layers, a 300-token prompt cached), a whole forward of n rows,
# oneDNN for every product against MKL up to this many rows: 1 row 40.8 against 30.8 ms, 2 rows 40.9 / 35.7,
# 3 rows 39.5 / 38.7, 4 rows (MKL) 55.1 against 39-40 (oneDNN). The services, one request at a time (5 MT-Bench
# prompts, 2 stage processes, the builds alternated twice): TBT pp 71.4 / 71.9 ms with oneDNN for every product,
# 61.4 / 62.7 with MKL up to 2 rows. The GEMMs alone in a loop do not show it (level at 21-22 ms a stage, run to
# run): the gap is in the products' context, not their arithmetic. On AMD, MKL's small-M kernels are the slow
# ones (above): none there.
INTEL_MKL_ROWS = 3


def mkl_rows() -> int:
    """Rows up to which F.linear beats the packed oneDNN product on this host's CPU (0: never). A fixed rule of the
    CPU's make, not a timing: every process of a host then computes a row the same way."""
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return 0
    return INTEL_MKL_ROWS if vendor == "GenuineIntel" and torch.backends.mkl.is_available() else 0


def onednn_linear(weights: StageWeights, small: int | None = None) -> Callable | None:
    """lin(x, w, b) over this stage's weight matrices through oneDNN packed copies, or None where it can't.
    Products of up to `small` rows (default: mkl_rows()) go to F.linear instead."""
    if not torch.backends.mkldnn.is_available():
        return None
    matrices = [m for layer in weights.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    matrices += [weights.lm_head] if weights.lm_head is not None else []
    try:
        packed = {id(m): torch.ops.mkldnn._reorder_linear_weight(m, None) for m in matrices}
    except RuntimeError:  # this CPU's oneDNN cannot pack the dtype
        return None

    small = mkl_rows() if small is None else small

    def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n <= small:
            return F.linear(x, w, b)  # [n, out]
        if n < MIN_ROWS:  # zero rows up to MIN_ROWS: oneDNN's kernel for 4 rows beats its 1-3-row one
            x = torch.cat([x, x.new_zeros(MIN_ROWS - n, x.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed[id(w)], b, "none", [], "")[:n]  # [n, out]

    return lin
