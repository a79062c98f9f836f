"""One device per compute process: which one, and the dtype that suits it.

`--device cpu|cuda|cuda:N`. A bare `cuda` means the GPU of this process's
local rank (LOCAL_RANK under torchrun, else the stage rank modulo the GPUs
this process sees), as torchrun-launched workers expect. The device is made
current (torch.cuda.set_device) so NCCL and every allocation without an
explicit device land on it.
"""

from __future__ import annotations

import torch

from shared.types.config import DTYPES
from shared.types.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'cpu', 'cuda' (the local rank's GPU) or 'cuda:N' -> a device, made current when it is a GPU."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device '{name}': use cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device '{name}': only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but this process sees no CUDA GPU")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else local_rank % count
    if index >= count:
        raise ConfigError(f"device '{name}': this process sees {count} GPU(s)")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def default_dtype(device: torch.device | str) -> str:
    """bfloat16 on a GPU (what serving there means), float32 on a CPU (exact, and fast there)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}': choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)
