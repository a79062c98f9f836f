"""The dynamic speculative token tree of one request.

Each node has a token, a parent, a position and a cumulative score (the sum
of draft log-probabilities along its path). The root of the live tree is the
last accepted node; everything below it is speculation. See shared/types/batch.py
for the glossary (accepted, bonus, pruned, level).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shared.types.batch import ROOT_PARENT


class Status(enum.Enum):
    DRAFTED = "drafted"  # proposed by the draft source, not sent
    SENT = "sent"  # in the pipe, waiting for verification
    ACCEPTED = "accepted"  # part of the output


@dataclass
class Node:
    node_id: int
    token: int
    parent: int  # ROOT_PARENT for the first node after the prompt
    position: int
    score: float  # cumulative draft log-probability from the tree's first node
    status: Status
    children: list[int] = field(default_factory=list)
    expanded: bool = False  # the draft source has proposed (or declined) its children
    rank: int = 0  # once sent: its rank by score in the level it was sent in (the width plan's acceptance by width)


class TokenTree:
    """Nodes of one request. Pruned nodes are deleted outright."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self._next_id = 0

    def __contains__(self, node_id: int) -> bool:
        return node_id in self.nodes

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def _new(self, token: int, parent: int, position: int, score: float, status: Status) -> Node:
        node = Node(self._next_id, token, parent, position, score, status)
        self._next_id += 1
        self.nodes[node.node_id] = node
        if parent != ROOT_PARENT and parent in self.nodes:
            self.nodes[parent].children.append(node.node_id)
        return node

    def add_accepted(self, token: int, parent: int, position: int) -> Node:
        """A token the target chose (first token, bonus): accepted by construction."""
        return self._new(token, parent, position, 0.0, Status.ACCEPTED)

    def add_proposals(self, parent: int, proposals: list[tuple[int, float]]) -> list[int]:
        """Drafted children of `parent` from (token, log-probability) pairs; duplicates ignored."""
        node = self.nodes[parent]
        node.expanded = True
        existing = {self.nodes[c].token for c in node.children}
        added = []
        for token, logprob in proposals:
            if token in existing:
                continue
            existing.add(token)
            child = self._new(token, parent, node.position + 1, node.score + logprob, Status.DRAFTED)
            added.append(child.node_id)
        return added

    def best_children(self, parents: list[int], width: int) -> list[int]:
        """The `width` highest-scoring drafted children of these parents (one tree level)."""
        candidates = [
            c for p in parents if p in self.nodes for c in self.nodes[p].children
            if self.nodes[c].status is Status.DRAFTED
        ]
        candidates.sort(key=lambda c: (-self.nodes[c].score, c))
        return sorted(candidates[:width])  # id order keeps parents before children

    def sent_child_with_token(self, parent: int, token: int) -> int | None:
        for c in self.nodes[parent].children:
            node = self.nodes[c]
            if node.token == token and node.status is Status.SENT:
                return c
        return None

    def subtree(self, node_id: int) -> list[int]:
        """node_id and all its descendants."""
        out, stack = [], [node_id]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.nodes[n].children)
        return out

    def remove(self, node_ids: list[int]) -> None:
        """Delete nodes (callers pass whole subtrees)."""
        for n in node_ids:
            node = self.nodes.pop(n, None)
            if node is not None and node.parent in self.nodes:
                siblings = self.nodes[node.parent].children
                if n in siblings:
                    siblings.remove(n)

    def speculative(self) -> list[int]:
        """Every node that is not accepted: what a miss prunes."""
        return [n for n, node in self.nodes.items() if node.status is not Status.ACCEPTED]

    def forget_accepted_before(self, node_id: int) -> None:
        """Drop accepted ancestors of node_id: the output list already holds their tokens."""
        for n in [n for n, node in self.nodes.items() if node.status is Status.ACCEPTED and n != node_id]:
            del self.nodes[n]
        self.nodes[node_id].parent = ROOT_PARENT
