"""A stage that computes nothing, for measuring the pipeline beat itself (`python -m benchmarks.beat`).

`python -m stage_worker --null-compute-ms S` serves with this runner instead of a model: every forward takes S ms
(a sleep: the core stays free, as it would while a GPU computes) and passes zeros of the model's hidden size
on; the last stage answers every row with its own token as the target. A request's text then repeats its
last prompt token, the n-gram draft proposes that token, and every speculative level is accepted: the beat
runs with the pipe as full as SpecPipe can fill it. Nothing it outputs means anything; only the timing does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shared.compute.kv_cache import KVUse
from shared.types.batch import MicroBatch, PipelineEvent, StageOutput
from shared.types.config import ModelArch


@dataclass(frozen=True)
class NullLayers:
    """What the stage log names: no layers."""

    start: int = 0
    end: int = 0


class NullRunner:
    """StageRunner's interface (add_request, release, apply, forward, kv_use, take_failures), no weights and no KV."""

    def __init__(self, arch: ModelArch, rank: int, world: int, compute_ms: float, dtype: torch.dtype):
        self.arch, self.dtype, self.device = arch, dtype, torch.device("cpu")
        self.weights = NullLayers()
        self.is_last = rank == world - 1
        self.compute_s = compute_ms / 1000
        self.requests: set[str] = set()

    def add_request(self, request_id: str, info, capacity: int) -> None:
        self.requests.add(request_id)

    def release(self, request_id: str) -> None:
        self.requests.discard(request_id)

    def apply(self, events: list[PipelineEvent]) -> None:
        for e in events:
            if e.kind == "finish":
                self.release(e.request_id)

    def kv_use(self, budget: int) -> KVUse:
        return KVUse(len(self.requests), 0, 0, budget)  # no KV

    def take_failures(self) -> dict[str, str]:
        return {}  # no request fails alone

    def forward(self, batch: MicroBatch) -> MicroBatch | StageOutput:
        if batch.rows and self.compute_s:
            time.sleep(self.compute_s)
        if self.is_last:
            return StageOutput(batch.batch_id, batch.rows, [r.token if r.needs_target else -1 for r in batch.rows])
        hidden = torch.zeros(len(batch.rows), self.arch.hidden_size, dtype=self.dtype)  # [n, H]
        return MicroBatch(batch.batch_id, batch.rows, hidden)
