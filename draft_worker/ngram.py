"""Prompt-lookup speculation: continue the longest suffix n-gram seen earlier.

For a node, the context is the accepted text followed by the node's
speculative path. The longest suffix (max_n down to min_n tokens) that also
occurs earlier in the context is looked up; the tokens that followed its
occurrences are proposed, scored by their frequency (log of the share).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from shared.types.batch import PipelineEvent
from shared.types.speculation import ExpansionJob, Proposals


@dataclass
class _Mirror:
    """Speculative nodes seen in jobs: node -> (parent, token, position)."""

    nodes: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def path(self, node_id: int, text_len: int) -> list[int]:
        """Tokens of the node's speculative path (positions >= text_len), oldest first."""
        tokens, node = [], node_id
        while node in self.nodes and self.nodes[node][2] >= text_len:
            parent, token, _ = self.nodes[node]
            tokens.append(token)
            node = parent
        return tokens[::-1]


class NgramSource:
    name = "ngram"
    computed_rows = 0  # a lookup: no forward

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096):
        self.max_n, self.min_n, self.window = max_n, min_n, window
        self.mirrors: dict[str, _Mirror] = {}

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None:
        self.mirrors[request_id] = _Mirror()

    def prefill(self, request_id: str, prompt: list[int]) -> int:
        return 0  # the lookup reads the text when asked

    def expand(self, jobs: list[ExpansionJob]) -> list[tuple[str, int, Proposals]]:
        out = []
        for job in jobs:
            mirror = self.mirrors.setdefault(job.request_id, _Mirror())
            for ref in job.nodes:
                if not ref.accepted:
                    mirror.nodes[ref.node_id] = (ref.parent_id, ref.token, ref.position)
                context = job.text[: ref.position + 1] if ref.accepted else job.text + mirror.path(ref.node_id, len(job.text))
                out.append((job.request_id, ref.node_id, self.propose(context, job.top_k)))
        return out

    def propose(self, context: list[int], k: int) -> Proposals:
        context = context[-self.window :]
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            suffix = context[-n:]
            follow = Counter(
                context[i + n] for i in range(len(context) - n) if context[i : i + n] == suffix
            )
            if follow:
                total = sum(follow.values())
                return [(tok, math.log(c / total)) for tok, c in follow.most_common(k)]
        return []

    def apply(self, events: list[PipelineEvent]) -> None:
        for event in events:
            mirror = self.mirrors.get(event.request_id)
            if mirror is None:
                continue
            if event.kind == "finish":
                del self.mirrors[event.request_id]
            elif event.kind == "prune":
                for n in event.node_ids:
                    mirror.nodes.pop(n, None)
