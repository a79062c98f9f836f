"""What flows through the pipeline: micro-batches of tree nodes.

Glossary (used throughout the code):
- node:       one token of a request's speculative tree, identified by
              (request_id, node_id). Its position is its index in the sequence.
- committed:  part of the request's accepted text. A committed node's KV sits
              in the prefix region of every stage's cache.
- in flight:  a node sent into the pipe and not yet accepted or pruned.
- accepted:   a speculative node whose token equals the target's token at its
              parent; it becomes committed.
- bonus:      the target's token after the last accepted node when no child
              matches (a miss). It is correct by construction and committed.
- pruned:     a node whose parent's target token chose another child, or whose
              ancestor was pruned. Every stage drops its row and its KV.
- level:      the W nodes that SpecPipe sends into stage 0 in one step; the
              children (by cumulative draft score) of the previous level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import msgspec

if TYPE_CHECKING:
    import torch

ROOT_PARENT = -1  # parent id of a node whose parent is the request's last committed token


class Row(NamedTuple):
    """Metadata of one node in a micro-batch (rows are in topological order). A named tuple, not a dataclass:
    every stage builds one per row per step, and a tuple is built in a quarter of a frozen dataclass's time."""

    request_id: str
    node_id: int
    parent_id: int  # ROOT_PARENT, or a node in flight (possibly earlier in this batch)
    position: int  # index in the sequence: RoPE position and KV slot order
    token: int  # stage 0 embeds it; later stages carry it for tracing
    committed: bool  # already accepted (prompt, first token, bonus): KV goes straight to the prefix
    needs_target: bool  # the last stage returns the target token following this node


@dataclass
class MicroBatch:
    """One pipeline step's input to a stage. hidden is None on stage 0."""

    batch_id: int
    rows: list[Row]
    hidden: torch.Tensor | None = None  # [num_rows, hidden]

    def __len__(self) -> int:
        return len(self.rows)

    def without(self, pruned: dict[str, set[int]], finished: set[str] = frozenset()) -> "MicroBatch":
        """This batch minus pruned nodes and finished requests (pruning reaches in-flight batches)."""
        keep = [
            i for i, r in enumerate(self.rows)
            if r.request_id not in finished and r.node_id not in pruned.get(r.request_id, ())
        ]
        if len(keep) == len(self.rows):
            return self
        hidden = self.hidden[keep] if self.hidden is not None else None
        return MicroBatch(self.batch_id, [self.rows[i] for i in keep], hidden)


@dataclass
class StageOutput:
    """What leaves the last stage: the target token after each row that asked for one."""

    batch_id: int
    rows: list[Row]
    targets: list[int] = field(default_factory=list)  # -1 where the row did not ask
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per row if any row's request asked, else []

    def target_tokens(self) -> "TargetTokens":
        return TargetTokens(self.batch_id, [r.request_id for r in self.rows], [r.node_id for r in self.rows],
                            list(self.targets), list(self.logprobs))


@dataclass(frozen=True)
class TargetTokens:
    """What verification needs of a stage output (in process, or a VerifyMsg): row identities and targets."""

    batch_id: int  # the stage-0 batch these rows entered with
    request_ids: list[str]
    node_ids: list[int]
    targets: list[int]  # -1 where the row did not ask
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # aligned with the rows, or [] if none asked


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """What a request with logprobs learns about one output token (on the wire: [logprob, ids, logprobs])."""

    logprob: float  # the chosen token's log-probability under the raw model
    top_ids: list[int] = []  # the most likely tokens, most likely first
    top_logprobs: list[float] = []  # their log-probabilities


class PipelineEvent(msgspec.Struct, frozen=True, array_like=True):
    """A verification outcome that every stage and draft source must apply (on the wire: [request, kind, ids])."""

    request_id: str
    kind: Literal["commit", "prune", "finish"]  # accepted nodes / dropped nodes / free everything
    node_ids: tuple[int, ...] = ()
