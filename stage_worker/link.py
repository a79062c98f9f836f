"""Stage-to-stage activations over torch.distributed point-to-point.

One code path: NCCL when the stage runs on CUDA, gloo on CPU; the link lives on
the stage runner's device, so hidden states go device to device (GPU to GPU
under NCCL) without a trip through host memory. Every step, stage k sends
exactly one message to stage k+1 (possibly empty), so the stages stay in
lockstep without any other coordination. A message is at most two transfers:

    header   int64[4]   LinkHeader: step, batch_id, rows n, hidden size
    payload  uint8[n * (6 * 8 + hidden * itemsize)]                                          (if n > 0)
               bytes [0, 48 n)   meta int64[n, 6], LinkRow per row: request slot, node, parent, position,
                                 token, flags
               bytes [48 n, ..)  hidden states [n, hidden] in the stages' dtype, as raw bytes

The states cross as bytes, so every dtype (float32, bfloat16, float16) crosses
the same way, whatever the backend supports natively; the receiver views the
two slices back (the states start at a multiple of 8 bytes, so the view is
aligned for any dtype) and reads only the meta slice into host memory. Both
ends must use the same dtype: the stages check it when the group forms.

Request ids are strings; the header carries the integer slot the scheduler
assigned when it admitted the request (StepMsg.admitted).

The group is formed once per pipeline run (shared/transport/membership.py): stage 0
hosts the run's store, every stage waits there for the others, then joins. A
lost peer surfaces as a RuntimeError from send/recv; the stage then leaves the
group (close(broken=True)) and joins the next run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch
import torch.distributed as dist

from shared.types.batch import MicroBatch
from shared.types.errors import ConfigError, ProtocolError
from shared.wire.messages import LinkHeader, LinkRow

HEADER = len(LinkHeader.__struct_fields__)
META = len(LinkRow.__struct_fields__)
META_BYTES = META * torch.int64.itemsize  # one row's meta in the payload


def payload_size(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the payload that follows a header of `rows` rows."""
    return rows * (META_BYTES + hidden * dtype.itemsize)


def pack(meta: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """One uint8 payload on the states' device: meta int64[n, 6] (from any device) then the states' bytes."""
    meta_bytes = meta.to(torch.int64).contiguous().view(-1).view(torch.uint8)
    state_bytes = states.contiguous().view(-1).view(torch.uint8)
    payload = torch.empty(meta_bytes.numel() + state_bytes.numel(), dtype=torch.uint8, device=states.device)
    payload[:meta_bytes.numel()].copy_(meta_bytes)
    payload[meta_bytes.numel():].copy_(state_bytes)
    return payload


def unpack(payload: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pack's inverse, without a copy: meta int64[rows, 6] and states dtype[rows, hidden], views of `payload`."""
    if payload.numel() != payload_size(rows, hidden, dtype):
        raise ProtocolError(f"payload of {payload.numel()} bytes for {rows} rows of {hidden} {dtype}")
    split = rows * META_BYTES  # a multiple of 8: the states' view is aligned for every dtype
    return payload[:split].view(torch.int64).view(rows, META), payload[split:].view(dtype).view(rows, hidden)


@dataclass(frozen=True)
class LinkConfig:
    rank: int
    world: int
    master_addr: str = "127.0.0.1"  # stage 0's address, as the other stages reach it
    master_port: int = 0  # stage 0's store port; 0: a free one, published per run (shared/transport/membership.py)
    timeout_s: float = 600.0  # one send/recv (a peer's compute included)
    rendezvous_s: float = 30.0  # connecting to stage 0's store


class RendezvousAbandoned(Exception):
    """The run being joined is no longer current: join the new one instead."""


class LinkLost(Exception):
    """A send or receive failed: a peer is gone (or the group broke). The stage leaves and joins the next run."""


def host_store(cfg: LinkConfig) -> dist.TCPStore:
    """Stage 0's side of a run's rendezvous: a store on master_port (0: any free port, see .port)."""
    from datetime import timedelta

    deadline = time.monotonic() + cfg.rendezvous_s
    while True:  # a fixed port may still be held for a moment by the run before
        try:
            return dist.TCPStore(cfg.master_addr, cfg.master_port, cfg.world, True,
                                 timedelta(seconds=cfg.rendezvous_s), wait_for_workers=False)
        except RuntimeError:
            if cfg.master_port == 0 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def join_store(cfg: LinkConfig, host: str, port: int) -> dist.TCPStore:
    from datetime import timedelta

    return dist.TCPStore(host, port, cfg.world, False, timedelta(seconds=cfg.rendezvous_s))


def wait_for_peers(store: dist.Store, world: int, still_wanted: Callable[[], bool], poll_s: float = 0.2) -> None:
    """Block until every stage has reached the run's store, or raise RendezvousAbandoned once the run is
    not wanted any more (a newer run began while a peer was missing)."""
    store.add("arrived", 1)
    while store.add("arrived", 0) < world:
        if not still_wanted():
            raise RendezvousAbandoned
        time.sleep(poll_s)


class ActivationLink:
    def __init__(self, cfg: LinkConfig, device: torch.device, dtype: torch.dtype, hidden_size: int,
                 store: dist.Store, tag: str = "run"):
        """Form the group of one run on `store` (every stage passes the same tag). `device` is where the stage
        computes: NCCL on a GPU, gloo on the CPU."""
        from datetime import timedelta

        self.cfg, self.device, self.dtype, self.hidden = cfg, torch.device(device), dtype, hidden_size
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        prefixed = dist.PrefixStore(tag, store)
        prefixed.set(f"dtype{cfg.rank}", str(dtype))
        dist.init_process_group(self.backend, store=prefixed, rank=cfg.rank, world_size=cfg.world,
                                timeout=timedelta(seconds=cfg.timeout_s))
        self._pending: list = []
        self._check_peers(prefixed)

    def _check_peers(self, store: dist.Store) -> None:
        """The payload is raw bytes: both ends of each hop must agree on the dtype (every stage has set it)."""
        for peer in (self.cfg.rank - 1, self.cfg.rank + 1):
            if 0 <= peer < self.cfg.world and (theirs := store.get(f"dtype{peer}").decode()) != str(self.dtype):
                self.close(broken=True)
                raise ConfigError(f"stage {self.cfg.rank} computes in {self.dtype} but stage {peer} in {theirs}: "
                                  "give every stage the same --dtype")

    def send(self, step: int, batch: MicroBatch, slots: dict[str, int]) -> None:
        """Post this step's output to the next stage without waiting for it."""
        try:
            self._send(step, batch, slots)
        except RuntimeError as exc:  # torch.distributed's errors (DistError) are RuntimeErrors
            raise LinkLost(f"sending step {step} to stage {self.cfg.rank + 1}: {exc}") from exc

    def recv(self, step: int, request_ids: dict[int, str]) -> MicroBatch:
        """The previous stage's output of step - 1, its states on this link's device."""
        try:
            return self._recv(step, request_ids)
        except RuntimeError as exc:
            raise LinkLost(f"receiving step {step - 1} from stage {self.cfg.rank - 1}: {exc}") from exc

    def _send(self, step: int, batch: MicroBatch, slots: dict[str, int]) -> None:
        for work in self._pending:  # the previous step's sends must be done before buffers are reused
            work.wait()
        n = len(batch.rows)
        header = msgspec.structs.astuple(LinkHeader(step, batch.batch_id, n, self.hidden))
        tensors = [torch.tensor(header, dtype=torch.int64, device=self.device)]
        if n:
            meta = torch.tensor([LinkRow.of(r, slots[r.request_id]) for r in batch.rows], dtype=torch.int64)
            tensors.append(pack(meta, batch.hidden.to(self.device, self.dtype)))
        self._pending = [dist.isend(t, self.cfg.rank + 1) for t in tensors]

    def _recv(self, step: int, request_ids: dict[int, str]) -> MicroBatch:
        src = self.cfg.rank - 1
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        h = LinkHeader(*header.tolist())
        if h.step != step - 1 or h.hidden != self.hidden:
            raise ProtocolError(f"stage {self.cfg.rank}: got step {h.step} (hidden {h.hidden}) while at step {step}")
        if h.rows == 0:
            return MicroBatch(h.batch_id, [], torch.empty(0, self.hidden, dtype=self.dtype, device=self.device))
        payload = torch.empty(payload_size(h.rows, self.hidden, self.dtype), dtype=torch.uint8, device=self.device)
        dist.recv(payload, src)
        meta, states = unpack(payload, h.rows, self.hidden, self.dtype)
        rows = [LinkRow(*m).row(request_ids[m[0]]) for m in meta.tolist()]  # the one read into host memory
        return MicroBatch(h.batch_id, rows, states)

    def close(self, broken: bool = False) -> None:
        """Leave the group; a broken link does not wait for its sends (their peer is gone)."""
        pending, self._pending = self._pending, []
        try:
            for work in pending if not broken else []:
                work.wait()  # raises when the peer is gone after all
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
