"""Each tree node's history on the last stage: the committed text, then the node's own path.

The last stage sees every row of a request (prompt rows, committed roots and bonus tokens, speculative nodes with
their parents) and every commit/prune event, so it knows the prefix of any node it computes without anything
more on the wire. Only requests whose choice depends on history (penalties, a grammar) keep one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.types.batch import Row
from shared.types.errors import ProtocolError


@dataclass
class NodePaths:
    """One request's tokens as the last stage knows them."""

    text: list[int] = field(default_factory=list)  # committed tokens by position (prompt, then output)
    nodes: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # in flight: node -> (parent, pos, token)
    accepted: set[int] = field(default_factory=set)  # committed before their row reached this stage

    def see(self, row: Row) -> None:
        """Note a row reaching this stage (rows come in topological order)."""
        if row.committed or row.node_id in self.accepted:
            self.accepted.discard(row.node_id)
            self._extend(row.position, row.token)
        else:
            self.nodes[row.node_id] = (row.parent_id, row.position, row.token)

    def commit(self, node_ids: tuple[int, ...]) -> None:
        for node in sorted(node_ids, key=lambda n: self.nodes[n][1] if n in self.nodes else -1):
            if node in self.nodes:
                _, position, token = self.nodes.pop(node)
                self._extend(position, token)
            else:
                self.accepted.add(node)

    def prune(self, node_ids: tuple[int, ...]) -> None:
        for node in node_ids:
            self.nodes.pop(node, None)
            self.accepted.discard(node)

    def history(self, row: Row) -> list[int]:
        """Tokens at positions 0..row.position along the row's path (its own token last)."""
        path, position, token, parent = [], row.position, row.token, row.parent_id
        while position >= len(self.text):
            path.append(token)
            if position - 1 < len(self.text):  # the parent is committed
                position -= 1
                break
            if parent not in self.nodes:
                raise ProtocolError(f"node {row.node_id}: ancestor {parent} unknown to the last stage")
            parent, position, token = self.nodes[parent]
        return self.text[: position + 1] + path[::-1]

    def _extend(self, position: int, token: int) -> None:
        if position != len(self.text):
            raise ProtocolError(f"committed token at position {position}, the text has {len(self.text)}")
        self.text.append(token)
