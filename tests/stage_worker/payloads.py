"""Micro-batches whose states hold every bit pattern of their dtype, for the link's tests (CPU, TCP, CUDA)."""

from __future__ import annotations

import torch

from shared.types.batch import ROOT_PARENT, MicroBatch, Row

HIDDEN = 24
SLOTS = {"req-a": 3, "req-b": 7}  # request id -> slot in the link's meta


def random_bits(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """States of random bit patterns (NaNs with payloads, infinities, -0, subnormals among them): only a copy of
    the bytes keeps them all."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2 ** 15), 2 ** 15, (rows, hidden * dtype.itemsize // 2), generator=g, dtype=torch.int16)
    return bits.view(ints).view(dtype).to(device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included), wherever each lives."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8)))


def batch_of(rows: int, dtype: torch.dtype, seed: int = 0) -> MicroBatch:
    """Rows of two requests (committed and speculative, root and inner parents) and random states."""
    meta = [Row("req-a" if i % 3 else "req-b", 100 + i, ROOT_PARENT if i % 2 else 99 + i, 40 + i, 1000 * i + 7,
                i % 4 == 0, i % 2 == 1) for i in range(rows)]
    return MicroBatch(5 + rows, meta, random_bits(rows, HIDDEN, dtype, seed))


class _Done:
    def wait(self) -> bool:
        return True


class Loopback:
    """torch.distributed's isend/recv as the link calls them, through a list in this process: a one-stage group
    (no peer, so one GPU does) can send to itself and every transfer is seen."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def isend(self, tensor: torch.Tensor, dst: int) -> _Done:
        self.sent.append(tensor.clone())
        return _Done()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        got = self.sent.pop(0)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.device == tensor.device
        tensor.copy_(got)


def loopback_link(monkeypatch, device: str, dtype: torch.dtype):
    """(a real ActivationLink in a one-stage torch.distributed group on `device`, its Loopback): NCCL on a GPU;
    on the CPU the same DistWire under gloo (the CPU link itself is TCP); close the link after use."""
    import torch.distributed as dist

    from stage_worker import link as link_module
    from stage_worker.link import ActivationLink, DistWire, LinkConfig

    if torch.device(device).type == "cpu":
        monkeypatch.setattr(link_module, "SocketWire", lambda cfg, store, _: DistWire(cfg, store, "gloo"))
    wire = Loopback()
    link = ActivationLink(LinkConfig(0, 1), torch.device(device), dtype, HIDDEN, dist.HashStore())
    monkeypatch.setattr(dist, "isend", wire.isend)
    monkeypatch.setattr(dist, "recv", wire.recv)
    return link, wire
