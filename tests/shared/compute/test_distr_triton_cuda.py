"""The Triton DistrAttention kernel on an NVIDIA GPU (marker cuda: deselected in CI, run by benchmarks/gpu_check.sh).

Against the torch reference on the same GPU, fp32 inputs upcast from the kernel's own: bf16 rounds each product
to ~3 significant digits and fp32 tl.dot uses TF32 (10-bit mantissa), so max |Δ| / max |reference| < 3e-2
(bf16) and < 1e-2 (fp32); the groups agree exactly, since both hash in fp32 (column_groups).
"""

from __future__ import annotations

import pytest
import torch

from shared.compute.distr_attention import distr_attention_reference
from shared.types.config import AttentionConfig

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton", reason="triton is not installed (a CUDA torch from PyPI brings it)")

TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-2}
CASES = {  # label: n, h, g, d, q_offset, G, fuse, layout
    "d=64, G=2, mean_sum, strided": (1000, 8, 8, 64, 0, 2, "mean_sum", "strided"),
    "d=128, G=4, sum_one, strided": (1024, 4, 4, 128, 0, 4, "sum_one", "strided"),
    "gqa 4:1, chunk after a prefix": (700, 8, 2, 64, 300, 2, "mean_sum", "adjacent"),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference_on_the_gpu(case, dtype) -> None:
    from shared.compute.distr_triton import distr_attention_triton

    n, h, g, d, q_offset, G, fuse, layout = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, h, d, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(q_offset + n, g, d, device="cuda", generator=gen).to(dtype) for _ in range(2))
    cfg = AttentionConfig("distr", group_size=G, fuse=fuse, layout=layout)
    out = distr_attention_triton(q, k, v, cfg, q_offset=q_offset).float()
    ref = distr_attention_reference(q.float(), k.float(), v.float(), cfg, q_offset=q_offset)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < TOLERANCE[dtype]
