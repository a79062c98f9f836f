"""Load only one stage's weights from a Hugging Face safetensors folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shared.compute.model import LayerWeights
from shared.types.config import ModelArch
from shared.types.errors import ConfigError


@dataclass
class StageWeights:
    """Weights of layers [start, end); embedding on the first stage, norm and head on the last."""

    start: int
    end: int
    layers: list[LayerWeights]
    embed: torch.Tensor | None  # [V, H]
    final_norm: torch.Tensor | None  # [H]
    lm_head: torch.Tensor | None  # [V, H]


class _TensorIndex:
    """Lazily opens the safetensors shards holding each tensor name."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: model_dir / shard for name, shard in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"no *.safetensors weights in {model_dir}")
            self.where = {}
            for f in files:
                with _open(f) as handle:
                    self.where.update({name: f for name in handle.keys()})

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"weight '{name}' missing from the checkpoint")
        with _open(self.where[name]) as handle:
            return handle.get_tensor(name).to(self.device, self.dtype).contiguous()


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for truncated/garbage files
        raise ConfigError(f"corrupt or unreadable weights file {path}: {exc}") from exc


def _layer(index: _TensorIndex, i: int, arch: ModelArch) -> LayerWeights:
    p = f"model.layers.{i}."
    qkv = torch.cat([index.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
    bias = None
    if index.has(p + "self_attn.q_proj.bias"):
        bias = torch.cat([index.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
    return LayerWeights(
        qkv=qkv,
        qkv_bias=bias,
        o=index.get(p + "self_attn.o_proj.weight"),
        gate_up=torch.cat([index.get(p + "mlp.gate_proj.weight"), index.get(p + "mlp.up_proj.weight")]),
        down=index.get(p + "mlp.down_proj.weight"),
        attn_norm=index.get(p + "input_layernorm.weight"),
        mlp_norm=index.get(p + "post_attention_layernorm.weight"),
    )


def load_stage_weights(
    model_dir: Path, arch: ModelArch, start: int, end: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StageWeights:
    """Read layers [start, end) and the first/last stage extras, nothing else, onto `device`."""
    if not 0 <= start < end <= arch.num_layers:
        raise ConfigError(f"layer range [{start}, {end}) outside the model's {arch.num_layers} layers")
    index = _TensorIndex(Path(model_dir), dtype, torch.device(device))
    first, last = start == 0, end == arch.num_layers
    embed = index.get("model.embed_tokens.weight") if first else None
    head = None
    if last:
        tied = arch.tie_embeddings or not index.has("lm_head.weight")
        head = index.get("model.embed_tokens.weight") if tied else index.get("lm_head.weight")
    return StageWeights(
        start=start,
        end=end,
        layers=[_layer(index, i, arch) for i in range(start, end)],
        embed=embed,
        final_norm=index.get("model.norm.weight") if last else None,
        lm_head=head,
    )
