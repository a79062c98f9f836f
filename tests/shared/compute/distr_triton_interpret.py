"""Run the Triton kernel under Triton's interpreter and compare it with the CPU reference (a helper, not tests).

    TRITON_INTERPRET=1 python -m tests.shared.compute.distr_triton_interpret < cases.json > errors.json

Triton picks interpreter or GPU when it jits, at import, from TRITON_INTERPRET: hence a process of its own,
started by tests/shared/compute/test_distr_triton.py. Each case (a JSON object: label -> fields) gives random
Q/K/V, or Q/K/V captured from a real model's prefill ("model": name, "layer": index), in fp32 or "dtype"
(float16; bfloat16 does not work here: the interpreter's tl.dot multiplies bf16's raw bits as integers, so bf16
is checked on a GPU only, tests/shared/compute/test_distr_triton_cuda.py); the answer maps each
label to the kernel's max |Δ| against distr_attention_reference, relative to max |reference|, and, for G = 1,
against exact causal attention too.
"""

from __future__ import annotations

import json
import sys

import torch

from shared.compute import runner as runner_module
from shared.compute.distr_attention import distr_attention_reference
from shared.compute.distr_triton import distr_attention_triton
from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import load_stage_weights
from shared.model_store import load_tokenizer, resolve_model
from shared.types.batch import MicroBatch, Row
from shared.types.config import AttentionConfig, ModelArch, SamplingParams
from tests.shared.compute.test_distr_attention import exact_attention

TEXT = ("Pipeline parallel serving splits a model's layers into stages, and speculative decoding keeps every stage "
        "busy by sending draft tokens ahead. ") * 12


def random_qkv(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    n, h, g, d = case["n"], case["h"], case["g"], case["d"]
    q = torch.randn(n, h, d, generator=gen)
    k, v = (torch.randn(case.get("q_offset", 0) + n, g, d, generator=gen) for _ in range(2))
    return q, k, v


def model_qkv(name: str, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (RoPE-rotated) Q, K, V that `layer` attends with in one prefill chunk of `tokens` tokens of TEXT."""
    model_dir = resolve_model(name)
    arch = ModelArch.from_model_dir(model_dir)
    prompt = load_tokenizer(model_dir).encode(TEXT)[:tokens]
    captured = []

    def capture(q, k, v, cfg, causal=True, q_offset=0):
        captured.append((q.clone(), k.clone(), v.clone()))
        return distr_attention_reference(q, k, v, cfg, causal, q_offset)

    cfg = AttentionConfig("distr", group_size=1, block_rows=16, layers=str(layer))
    runner = StageRunner(arch, load_stage_weights(model_dir, arch, 0, layer + 1), cfg)
    runner.add_request("r", RequestInfo(len(prompt), SamplingParams()), len(prompt))
    original, runner_module.distr_attention = runner_module.distr_attention, capture
    try:
        runner.hidden(MicroBatch(0, [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(prompt)]))
    finally:
        runner_module.distr_attention = original
    return captured[0]


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def run_case(case: dict) -> dict:
    q, k, v = model_qkv(case["model"], case["layer"], case["n"]) if "model" in case else random_qkv(case)
    q, k, v = (x.to(getattr(torch, case.get("dtype", "float32"))) for x in (q, k, v))  # the reference: upcast
    cfg = AttentionConfig("distr", group_size=case["G"], block_rows=case["block_rows"], fuse=case["fuse"],
                          layout=case["layout"])
    causal, q_offset = case.get("causal", True), case.get("q_offset", 0)
    out = distr_attention_triton(q, k, v, cfg, causal, q_offset, block_keys=case["block_keys"])
    q, k, v, out = q.float(), k.float(), v.float(), out.float()
    errors = {"reference": relative(out, distr_attention_reference(q, k, v, cfg, causal, q_offset))}
    if case["G"] == 1 and causal:
        errors["exact"] = relative(out, exact_attention(q, k, v, q_offset))
    return errors


def main() -> int:
    if not __import__("triton").knobs.runtime.interpret:
        print("TRITON_INTERPRET=1 must be set before triton is imported", file=sys.stderr)
        return 2
    cases = json.load(sys.stdin)
    json.dump({label: run_case(case) for label, case in cases.items()}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
