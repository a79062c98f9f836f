"""RoPE frequencies against transformers' own, default and Llama 3 scaling (Llama-3.2-1B's and 3.1-70B's)."""

from __future__ import annotations

import pytest
import torch

from shared.compute.model import rope_frequencies
from shared.types.config import ModelArch
from shared.types.errors import ConfigError

pytestmark = pytest.mark.unit

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# label: (head dim, rope theta, rope scaling as a config.json writes it)
CONFIGS = {
    "default": (64, 10000.0, None),
    "Llama-3.2-1B (llama3, factor 32)": (64, 500000.0, LLAMA3),
    "Llama-3.1-70B (llama3, factor 8)": (128, 500000.0, {**LLAMA3, "factor": 8.0}),
}


def _config(head_dim: int, theta: float, scaling: dict | None) -> dict:
    heads = 4
    return {"model_type": "llama", "vocab_size": 128, "hidden_size": head_dim * heads, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": 2, "rope_theta": theta,
            "max_position_embeddings": 131072, "rope_scaling": scaling}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_rope_frequencies_match_transformers(case) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _config(*CONFIGS[case])
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    rope_type = (cfg["rope_scaling"] or {}).get("rope_type", "default")
    if rope_type == "default":
        d = cfg["hidden_size"] // cfg["num_attention_heads"]
        expected = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    else:
        expected, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
        assert attention_factor == 1.0  # llama3 does not scale attention
    ours = rope_frequencies(ModelArch.from_hf_config(cfg))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


def test_other_rope_types_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="unsupported rope type 'yarn'"):
        ModelArch.from_hf_config(_config(64, 10000.0, {"rope_type": "yarn", "factor": 4.0}))
