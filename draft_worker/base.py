"""The interface every speculative token source implements.

A source proposes children for tree nodes (ExpansionJob -> proposals) and
follows verification events: on commit it re-roots, on prune it forgets the
pruned nodes, on finish it frees the request. It never blocks the pipeline:
a source may propose nothing, and speculation then simply pauses.
"""

from __future__ import annotations

from typing import Protocol

from scheduler.scheduler import ExpansionJob
from shared.batch import PipelineEvent

Proposals = list[tuple[int, float]]  # (token, draft log-probability), best first


class SpeculativeSource(Protocol):
    name: str

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None: ...

    def expand(self, jobs: list[ExpansionJob]) -> list[tuple[str, int, Proposals]]:
        """Children for every node of every job: (request_id, node_id, proposals)."""
        ...

    def apply(self, events: list[PipelineEvent]) -> None: ...
