"""What the scheduler, the draft sources and the executors exchange about speculation.

The scheduler asks for children of tree nodes (ExpansionJob of NodeRefs); a
source answers with Proposals per node and follows verification events. The
wire form of a job is shared.wire.messages.ExpansionJobMsg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import msgspec

from shared.types.batch import PipelineEvent

Proposals = list[tuple[int, float]]  # (token, draft log-probability), best first


class NodeRef(msgspec.Struct, frozen=True, array_like=True):
    """A node handed to a draft source for expansion (on the wire: [node, parent, token, position, accepted])."""

    node_id: int
    parent_id: int
    token: int
    position: int
    accepted: bool


@dataclass
class ExpansionJob:
    """Propose children for `nodes`; `text` is the accepted sequence (prompt + output)."""

    request_id: str
    text: list[int]
    nodes: list[NodeRef]
    top_k: int


class SpeculativeSource(Protocol):
    """A draft: proposes children for tree nodes, follows prune/commit/finish; it never blocks the pipeline
    (a source may propose nothing, and speculation then simply pauses)."""

    name: str
    computed_rows: int  # rows its last expand computed: the nodes and what it caught up on (a prompt, a bonus
    # token); what a modeled clock charges the draft for (0: a lookup computes nothing)

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None: ...

    def prefill(self, request_id: str, prompt: list[int]) -> int:
        """Compute the prompt ahead of the first expansion (a draft beside the pipe does it while the target
        prefills); the rows computed (0: a lookup needs none)."""
        ...

    def expand(self, jobs: list[ExpansionJob]) -> list[tuple[str, int, Proposals]]:
        """Children for every node of every job: (request_id, node_id, proposals)."""
        ...

    def apply(self, events: list[PipelineEvent]) -> None: ...


def times_a_level(nodes: int, rows: int) -> bool:
    """Whether a draft forward that expanded `nodes` frontier nodes by computing `rows` rows is a level's pace (a
    width plan's input): a forward that caught up on a prompt is not (a bonus token's row or two may be)."""
    return nodes > 0 and rows <= 2 * nodes
