"""Stage-to-stage activations over torch.distributed point-to-point.

One code path: NCCL when the stage runs on CUDA, gloo on CPU. Every step,
stage k sends exactly one message to stage k+1 (possibly empty), so the
stages stay in lockstep without any other coordination:

    header  int64[4]          LinkHeader: step, batch_id, rows n, hidden size
    meta    int64[n, 6]       LinkRow per row: request slot, node, parent, position, token, flags   (if n > 0)
    hidden  dtype[n, hidden]  the stage's output states                                            (if n > 0)

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
from shared.types.errors import ProtocolError
from shared.wire.messages import LinkHeader, LinkRow

HEADER = len(LinkHeader.__struct_fields__)
META = len(LinkRow.__struct_fields__)


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
        """Form the group of one run on `store` (every stage passes the same tag)."""
        from datetime import timedelta

        self.cfg, self.device, self.dtype, self.hidden = cfg, device, dtype, hidden_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore(tag, store), rank=cfg.rank, world_size=cfg.world,
                                timeout=timedelta(seconds=cfg.timeout_s))
        self._pending: list = []

    def send(self, step: int, batch: MicroBatch, slots: dict[str, int]) -> None:
        """Post this step's output to the next stage without waiting for it."""
        try:
            self._send(step, batch, slots)
        except RuntimeError as exc:  # torch.distributed's errors (DistError) are RuntimeErrors
            raise LinkLost(f"sending step {step} to stage {self.cfg.rank + 1}: {exc}") from exc

    def recv(self, step: int, request_ids: dict[int, str]) -> MicroBatch:
        """The previous stage's output of step - 1."""
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
            meta = [LinkRow.of(r, slots[r.request_id]) for r in batch.rows]
            tensors += [torch.tensor(meta, dtype=torch.int64, device=self.device),
                        batch.hidden.to(self.device, self.dtype).contiguous()]
        self._pending = [dist.isend(t, self.cfg.rank + 1) for t in tensors]

    def _recv(self, step: int, request_ids: dict[int, str]) -> MicroBatch:
        src = self.cfg.rank - 1
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        h = LinkHeader(*header.tolist())
        if h.step != step - 1 or h.hidden != self.hidden:
            raise ProtocolError(f"stage {self.cfg.rank}: got step {h.step} (hidden {h.hidden}) while at step {step}")
        if h.rows == 0:
            return MicroBatch(h.batch_id, [], torch.empty(0, self.hidden, dtype=self.dtype))
        meta = torch.empty(h.rows, META, dtype=torch.int64, device=self.device)
        states = torch.empty(h.rows, self.hidden, dtype=self.dtype, device=self.device)
        dist.recv(meta, src)
        dist.recv(states, src)
        rows = [LinkRow(*m).row(request_ids[m[0]]) for m in meta.tolist()]
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
