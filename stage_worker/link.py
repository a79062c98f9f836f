"""Stage-to-stage activations over torch.distributed point-to-point.

One code path: NCCL when the stage runs on CUDA, gloo on CPU. Every step,
stage k sends exactly one message to stage k+1 (possibly empty), so the
stages stay in lockstep without any other coordination:

    header  int64[4]          step, batch_id, rows n, hidden size
    meta    int64[n, 6]       request slot, node, parent, position, token, flags   (if n > 0)
    hidden  dtype[n, hidden]  the stage's output states                            (if n > 0)

Request ids are strings; the header carries the integer slot the scheduler
assigned when it admitted the request (StepMsg.admitted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.batch import MicroBatch, Row
from shared.errors import ProtocolError

HEADER = 4
META = 6
COMMITTED, NEEDS_TARGET = 1, 2


def pack_flags(row: Row) -> int:
    return (COMMITTED if row.committed else 0) | (NEEDS_TARGET if row.needs_target else 0)


@dataclass(frozen=True)
class LinkConfig:
    rank: int
    world: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29531
    timeout_s: float = 600.0


class ActivationLink:
    def __init__(self, cfg: LinkConfig, device: torch.device, dtype: torch.dtype, hidden_size: int):
        from datetime import timedelta

        self.cfg, self.device, self.dtype, self.hidden = cfg, device, dtype, hidden_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{cfg.master_addr}:{cfg.master_port}",
            rank=cfg.rank,
            world_size=cfg.world,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
        self._pending: list = []

    def send(self, step: int, batch: MicroBatch, slots: dict[str, int]) -> None:
        """Post this step's output to the next stage without waiting for it."""
        for work in self._pending:  # the previous step's sends must be done before buffers are reused
            work.wait()
        n = len(batch.rows)
        header = torch.tensor([step, batch.batch_id, n, self.hidden], dtype=torch.int64, device=self.device)
        tensors = [header]
        if n:
            meta = [[slots[r.request_id], r.node_id, r.parent_id, r.position, r.token, pack_flags(r)] for r in batch.rows]
            tensors += [torch.tensor(meta, dtype=torch.int64, device=self.device), batch.hidden.to(self.device, self.dtype).contiguous()]
        self._pending = [dist.isend(t, self.cfg.rank + 1) for t in tensors]

    def recv(self, step: int, request_ids: dict[int, str]) -> MicroBatch:
        """The previous stage's output of step - 1."""
        src = self.cfg.rank - 1
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        sent_step, batch_id, n, hidden = header.tolist()
        if sent_step != step - 1 or hidden != self.hidden:
            raise ProtocolError(f"stage {self.cfg.rank}: got step {sent_step} (hidden {hidden}) while at step {step}")
        if n == 0:
            return MicroBatch(batch_id, [], torch.empty(0, self.hidden, dtype=self.dtype))
        meta = torch.empty(n, META, dtype=torch.int64, device=self.device)
        states = torch.empty(n, self.hidden, dtype=self.dtype, device=self.device)
        dist.recv(meta, src)
        dist.recv(states, src)
        rows = [
            Row(request_ids[s], node, parent, pos, tok, bool(f & COMMITTED), bool(f & NEEDS_TARGET))
            for s, node, parent, pos, tok, f in meta.tolist()
        ]
        return MicroBatch(batch_id, rows, states)

    def close(self) -> None:
        for work in self._pending:
            work.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
