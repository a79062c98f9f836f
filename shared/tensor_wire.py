"""Tensors on the wire as {"dtype", "shape", "data"}: raw bytes, never pickle."""

from __future__ import annotations

from typing import Any

import torch

from shared.errors import ProtocolError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ProtocolError(f"cannot send tensors of dtype {name}")
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    return {"dtype": name, "shape": list(t.shape), "data": raw.numpy().tobytes()}


def decode_tensor(obj: Any) -> torch.Tensor:
    try:
        dtype, shape, data = _DTYPES[obj["dtype"]], [int(s) for s in obj["shape"]], obj["data"]
        carrier = torch.int16 if dtype == torch.bfloat16 else dtype
        flat = torch.frombuffer(bytearray(data), dtype=carrier)
        return flat.view(dtype).reshape(shape) if carrier != dtype else flat.reshape(shape)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(f"malformed tensor: {exc}") from exc
