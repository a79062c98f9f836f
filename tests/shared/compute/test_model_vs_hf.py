"""Our compact decoder against transformers' own model on the same weights (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import load_stage_weights
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams, split_layers

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2]


def _our_logits(model_dir, stages: int) -> torch.Tensor:
    arch = ModelArch.from_model_dir(model_dir)
    rows = [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(PROMPT)]
    batch = MicroBatch(0, rows)
    for start, end in split_layers(arch.num_layers, stages):  # hidden states handed stage to stage
        runner = StageRunner(arch, load_stage_weights(model_dir, arch, start, end))
        runner.add_request("r", RequestInfo(len(PROMPT), SamplingParams()), 64)
        batch = MicroBatch(0, rows, runner.hidden(batch))
    return runner.logits(batch.hidden)


def _hf_logits(model_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


@pytest.mark.unit
@pytest.mark.parametrize("stages", [1, 3], ids=["whole", "three-stages"])
def test_tiny_logits_match_transformers(tiny_dir, stages) -> None:
    ours, theirs = _our_logits(tiny_dir, stages), _hf_logits(tiny_dir)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_dir) -> None:
    ours, theirs = _our_logits(smollm2_dir, 2), _hf_logits(smollm2_dir)
    # fp32 through 30 layers with other kernels: measured max abs diff ~1e-4 on logits of scale ~20
    assert (ours - theirs).abs().max().item() < 2e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _random_model_dir(tmp_path: Path, config) -> Path:
    """A small model of `config`'s family with random weights (seeded), saved as transformers saves it."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so a model that ignored them would not match
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


# label: the config of a small random model of each family the engine runs
FAMILIES = {
    "Qwen2 (q/k/v biases)": lambda: Qwen2Config(
        vocab_size=40000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "Llama 3 (llama3 RoPE scaling)": lambda: LlamaConfig(
        vocab_size=40000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}),
}


@pytest.mark.unit
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_match_transformers(tmp_path, family) -> None:
    model_dir = _random_model_dir(tmp_path, FAMILIES[family]())
    ours, theirs = _our_logits(model_dir, 2), _hf_logits(model_dir)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
