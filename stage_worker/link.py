"""Stage-to-stage activations: NCCL between GPUs, plain TCP between CPU stages.

Every step, stage k sends exactly one message to stage k+1 (possibly empty), so the stages stay in lockstep
without any other coordination. A message is a header and at most one payload:

    header   int64[4]   LinkHeader: step, batch_id, rows n, hidden size
    payload  uint8[n * (6 * 8 + hidden * itemsize)]                                          (if n > 0)
               bytes [0, 48 n)   meta int64[n, 6], LinkRow per row: request slot, node, parent, position,
                                 token, flags
               bytes [48 n, ..)  hidden states [n, hidden] in the stages' dtype, as raw bytes

Two wires carry it, chosen by the stage's device:
- `DistWire` (a GPU): torch.distributed point-to-point under NCCL, header and payload as two transfers, device
  to device with no trip through host memory.
- `SocketWire` (the CPU): one frame (header bytes, payload bytes) to an inbox that stage k+1 listens on
  (shared/transport/control.py). The bytes go out as soon as the step is computed, so the next stage finds
  its input already in its socket when it asks for it; gloo's point-to-point, used before, waits for the
  receiver to post each transfer (a rendezvous per tensor: 0.25 ms per step on a quiet 2-core CPU, 0.5-4 ms
  with a pipeline of processes on it).

The states cross as bytes, so every dtype (float32, bfloat16, float16) crosses the same way; the receiver views
the two slices back (the states start at a multiple of 8 bytes, so the view is aligned for any dtype) and reads
only the meta slice into host memory. Both ends must use the same dtype: the stages check it when the group
forms.

Request ids are strings; the header carries the integer slot the scheduler assigned when it admitted the
request (StepMsg.admitted).

The group is formed once per pipeline run (shared/transport/membership.py): stage 0 hosts the run's store,
every stage waits there for the others, then joins (the CPU wire's addresses travel through the same store).
A lost peer surfaces as LinkLost from send/recv (NCCL's error, or the run moving on while a CPU stage waits
for its input); the stage then leaves the group (close(broken=True)) and joins the next run.
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch
import torch.distributed as dist

from shared.transport.control import ControlConfig, Inbox, Outbox
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
    host: str = "127.0.0.1"  # this stage's address, as the stage before it reaches it (the CPU wire's PULL)
    timeout_s: float = 600.0  # one send/recv (a peer's compute included)
    rendezvous_s: float = 30.0  # connecting to stage 0's store
    poll_s: float = 0.25  # a CPU stage waiting for its input checks this often that the run is still on


class RendezvousAbandoned(Exception):
    """The run being joined is no longer current: join the new one instead."""


Payload = torch.Tensor | None  # uint8[payload_size(rows, hidden, dtype)], none for an empty micro-batch


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


class DistWire:
    """torch.distributed point-to-point (NCCL on GPUs): the header, then the payload, as two transfers."""

    def __init__(self, cfg: LinkConfig, store: dist.Store, backend: str = "nccl"):
        from datetime import timedelta

        self.cfg, self.backend = cfg, backend
        dist.init_process_group(self.backend, store=store, rank=cfg.rank, world_size=cfg.world,
                                timeout=timedelta(seconds=cfg.timeout_s))
        self._pending: list = []

    def send(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        for work in self._pending:  # the previous step's sends must be done before buffers are reused
            work.wait()
        tensors = [header] if payload is None else [header, payload]
        self._pending = [dist.isend(t, self.cfg.rank + 1) for t in tensors]

    def recv(self, device: torch.device, payload_bytes: Callable[[LinkHeader], int]) -> tuple[LinkHeader, Payload]:
        """The header, then the payload it announces (None when it announces none), on `device`."""
        src = self.cfg.rank - 1
        header = torch.empty(HEADER, dtype=torch.int64, device=device)
        dist.recv(header, src)
        h = LinkHeader(*header.tolist())
        if (n := payload_bytes(h)) == 0:
            return h, None
        payload = torch.empty(n, dtype=torch.uint8, device=device)
        dist.recv(payload, src)
        return h, payload

    def close(self, broken: bool) -> None:
        pending, self._pending = self._pending, []
        try:
            for work in pending if not broken else []:
                work.wait()  # raises when the peer is gone after all
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class SocketWire:
    """One frame per step (header bytes, then payload bytes) from stage k to an inbox stage k+1 listens on
    (shared/transport/control.py: plain TCP, read in the stage's own thread)."""

    backend = "tcp"

    def __init__(self, cfg: LinkConfig, store: dist.Store, still_current: Callable[[], bool]):
        self.cfg, self.still_current = cfg, still_current
        self.inbox = self.outbox = None
        self.frames: deque[bytearray] = deque()  # received, not yet taken (the stage before may run a step ahead)
        if cfg.rank > 0:
            self.inbox = Inbox(ControlConfig(cfg.host))
            store.set(f"link{cfg.rank}", self.inbox.address)
        if cfg.rank < cfg.world - 1:
            self.outbox = Outbox([store.get(f"link{cfg.rank + 1}").decode()])  # waits (rendezvous_s) for the peer
            if not self.outbox.connected:
                self.close(broken=True)
                raise RuntimeError(f"cannot reach stage {cfg.rank + 1} at {self.outbox.addresses[0]}")

    def send(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        """Returns at once: a payload the socket cannot take now goes out from the connection's thread (the
        tensors are this step's own, never reused)."""
        self.outbox.send_raw(header.numpy(), *([] if payload is None else [payload.numpy()]))
        if not self.outbox.connected:
            raise RuntimeError("the next stage broke off")

    def recv(self, device: torch.device, payload_bytes: Callable[[LinkHeader], int]) -> tuple[LinkHeader, Payload]:
        deadline = time.monotonic() + self.cfg.timeout_s
        while not self.frames:
            self.frames.extend(self.inbox.recv_raw(int(1000 * self.cfg.poll_s)))
            if not self.frames and (not self.still_current() or time.monotonic() > deadline):
                raise RuntimeError("no input from the stage before (it is gone, or the pipeline re-formed)")
        frame = memoryview(self.frames.popleft())
        split = HEADER * torch.int64.itemsize
        if frame.nbytes < split:
            raise ProtocolError(f"stage {self.cfg.rank}: a link frame of {frame.nbytes} bytes")
        h = LinkHeader(*torch.frombuffer(frame[:split], dtype=torch.int64).tolist())
        if (n := payload_bytes(h)) != frame.nbytes - split:
            raise ProtocolError(f"stage {self.cfg.rank}: a payload of {frame.nbytes - split} bytes where the header "
                                f"says {n}")
        return h, torch.frombuffer(frame[split:], dtype=torch.uint8) if n else None

    def close(self, broken: bool) -> None:
        for end in (self.inbox, self.outbox):
            if end is not None:
                end.close()


class ActivationLink:
    def __init__(self, cfg: LinkConfig, device: torch.device, dtype: torch.dtype, hidden_size: int,
                 store: dist.Store, tag: str = "run", still_current: Callable[[], bool] = lambda: True):
        """Form the group of one run on `store` (every stage passes the same tag). `device` is where the stage
        computes: NCCL on a GPU, plain TCP on the CPU. `still_current` says whether the run is still on (a CPU
        stage waiting for its input gives up once it is not)."""
        self.cfg, self.device, self.dtype, self.hidden = cfg, torch.device(device), dtype, hidden_size
        prefixed = dist.PrefixStore(tag, store)
        prefixed.set(f"dtype{cfg.rank}", str(dtype))
        self._check_peers(prefixed)  # before any connection: a refusing peer never leaves one half made
        self.wire = DistWire(cfg, prefixed) if self.device.type == "cuda" else SocketWire(cfg, prefixed, still_current)
        self.backend = self.wire.backend

    def _check_peers(self, store: dist.Store) -> None:
        """The payload is raw bytes: both ends of each hop must agree on the dtype (every stage has set it)."""
        for peer in (self.cfg.rank - 1, self.cfg.rank + 1):
            if 0 <= peer < self.cfg.world and (theirs := store.get(f"dtype{peer}").decode()) != str(self.dtype):
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
        n = len(batch.rows)
        header = torch.tensor(msgspec.structs.astuple(LinkHeader(step, batch.batch_id, n, self.hidden)),
                              dtype=torch.int64, device=self.device)
        payload = None
        if n:
            meta = array("q")  # flat, then viewed: torch.tensor over a list of row lists costs 3-4x more a step
            for r in batch.rows:
                meta.extend(LinkRow.of(r, slots[r.request_id]))
            states = batch.hidden.to(self.device, self.dtype)
            payload = pack(torch.frombuffer(meta, dtype=torch.int64).view(n, META), states)
        self.wire.send(header, payload)

    def _recv(self, step: int, request_ids: dict[int, str]) -> MicroBatch:
        h, payload = self.wire.recv(self.device, self._payload_bytes)
        if h.step != step - 1:
            raise ProtocolError(f"stage {self.cfg.rank}: got step {h.step} while at step {step}")
        if h.rows == 0:
            return MicroBatch(h.batch_id, [], torch.empty(0, self.hidden, dtype=self.dtype, device=self.device))
        meta, states = unpack(payload, h.rows, self.hidden, self.dtype)
        rows = [LinkRow(*m).row(request_ids[m[0]]) for m in meta.tolist()]  # the one read into host memory
        return MicroBatch(h.batch_id, rows, states)

    def _payload_bytes(self, h: LinkHeader) -> int:
        """What the header announces; a peer of another hidden size is refused before anything else is read."""
        if h.hidden != self.hidden or h.rows < 0:
            raise ProtocolError(f"stage {self.cfg.rank}: a header of {h.rows} rows of hidden size {h.hidden}")
        return payload_size(h.rows, self.hidden, self.dtype)

    def close(self, broken: bool = False) -> None:
        """Leave the group; a broken link does not wait for its sends (their peer is gone)."""
        self.wire.close(broken)
