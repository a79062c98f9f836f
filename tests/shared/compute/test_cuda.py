"""The engine on an NVIDIA GPU (marker cuda: deselected in CI, run by benchmarks/gpu_check.sh on a lent GPU).

- Every policy on CUDA gives plain decoding's tokens: exact numerics in fp32 and bf16, fast numerics in fp32
  on tiny-random (far from ties; fast-mode divergence, bf16 included, is measured by benchmarks.divergence).
- CPU and CUDA agree token for token in exact fp32 (tiny-random, greedy and seeded).
- Weights, KV caches and outputs live on the GPU; the seeded draw picks the same token on both devices.
"""

from __future__ import annotations

import pytest
import torch

from shared.compute.runner import RequestInfo, load_stage
from shared.compute.sampling import target_tokens
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams
from tests.helpers import generate, pipeline

pytestmark = pytest.mark.cuda

PROMPTS = [[5, 17, 99, 3, 5, 17, 42, 7], list(range(40, 130)), [300, 301, 300, 301, 300]]
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=11)

# label: (policy, stages)
POLICIES = {"pp, 1 stage": ("pp", 1), "tree, 2 stages": ("tree", 2), "specpipe, 4 stages": ("specpipe", 4)}
# label: (numerics, dtype)
# fast bf16 is not here: bf16 rounding flips near-ties even on tiny-random (seen on the CPU), so its divergence
# rate is measured (benchmarks.divergence --dtype bfloat16 in gpu_check.sh), not asserted
MODES = {"exact fp32": ("exact", "float32"), "exact bf16": ("exact", "bfloat16"), "fast fp32": ("fast", "float32")}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(POLICIES))
def test_policies_agree_with_plain_decoding_on_cuda(tiny_dir, case, mode) -> None:
    policy, stages = POLICIES[case]
    numerics, dtype = MODES[mode]
    plain = pipeline(tiny_dir, "pp", 1, device="cuda", dtype=dtype)  # exact: plain decoding
    spec = pipeline(tiny_dir, policy, stages, numerics=numerics, device="cuda", dtype=dtype, draft_dtype=dtype)
    for i, prompt in enumerate(PROMPTS):
        for j, sampling in enumerate((SamplingParams(), SEEDED)):
            want = generate(plain, prompt, 24, sampling, rid=f"plain{i}-{j}").output
            assert generate(spec, prompt, 24, sampling, rid=f"spec{i}-{j}").output == want, (i, sampling)


def test_cpu_and_cuda_agree_in_exact_fp32(tiny_dir) -> None:
    """tiny-random only: the GPU machine is offline, and only tiny-random travels with the check (64 MiB)."""
    model_dir = tiny_dir
    cpu, gpu = pipeline(model_dir, "specpipe", 2), pipeline(model_dir, "specpipe", 2, device="cuda")
    for i, prompt in enumerate(PROMPTS):
        for j, sampling in enumerate((SamplingParams(), SEEDED)):
            want = generate(cpu, prompt, 24, sampling, rid=f"cpu{i}-{j}").output
            assert generate(gpu, prompt, 24, sampling, rid=f"gpu{i}-{j}").output == want, (i, sampling)


def test_stage_lives_on_the_gpu(tiny_dir) -> None:
    arch = ModelArch.from_model_dir(tiny_dir)
    runner = load_stage(tiny_dir, arch, 0, 2, torch.bfloat16, device="cuda")
    runner.add_request("r", RequestInfo(3, SamplingParams()), 64)
    out = runner.forward(MicroBatch(0, [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate([5, 6, 7])]))
    assert runner.device.type == "cuda" and runner.kv["r"].k.is_cuda and runner.cos.is_cuda
    assert out.hidden.is_cuda and out.hidden.dtype == torch.bfloat16


def test_seeded_draw_is_the_same_token_on_cpu_and_cuda() -> None:
    logits = torch.randn(16, 4096, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=s) if s % 2 else SamplingParams()
              for s in range(16)]
    indices = list(range(16))
    assert target_tokens(logits.cuda(), params, indices) == target_tokens(logits, params, indices)
