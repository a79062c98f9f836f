"""Per-request KV cache of one stage: committed prefix, then in-flight nodes.

Layout of a request's cache (per layer):  [ prefix (P slots) | in-flight nodes in arrival order | free ]
- A node attends to the prefix, its in-flight ancestors and itself, gathered
  in position order. That context is exactly the sequence plain decoding sees
  at the same position, which is what makes the tree path lossless.
- prune: the pruned nodes' slots are removed and the in-flight region is
  compacted in place (not just masked).
- commit: an accepted node becomes prefix once every older in-flight node is
  committed or pruned; since accepted nodes form a path, that is immediate
  after the siblings are pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from shared.types.batch import ROOT_PARENT, Row
from shared.types.errors import ProtocolError, RequestError


@dataclass
class RowContext:
    """Where a row's KV goes and what it attends to."""

    slot: int
    context: list[int]  # slots in position order, ending with `slot`


@dataclass
class RequestKV:
    """Preallocated cache of one request on one stage."""

    k: torch.Tensor  # [num_layers, capacity, kv_heads, head_dim]
    v: torch.Tensor  # [num_layers, capacity, kv_heads, head_dim]
    prefix_len: int = 0  # P: committed slots [0, P)
    inflight: list[int] = field(default_factory=list)  # node ids; slot of inflight[i] is P + i
    parent: dict[int, int] = field(default_factory=dict)  # in-flight node -> parent node
    accepted: set[int] = field(default_factory=set)  # accepted, waiting to become prefix

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def used(self) -> int:
        return self.prefix_len + len(self.inflight)

    def slot_of(self, node_id: int) -> int | None:
        try:
            return self.prefix_len + self.inflight.index(node_id)
        except ValueError:
            return None

    def place(self, row: Row) -> RowContext:
        """Reserve a slot for `row` and return its attention context."""
        if self.used >= self.capacity:
            raise RequestError(f"request {row.request_id}: KV cache full ({self.capacity} slots)")
        if row.committed:
            if self.inflight or row.position != self.prefix_len:
                raise ProtocolError(
                    f"committed row {row.node_id} at position {row.position} but prefix is "
                    f"{self.prefix_len} with {len(self.inflight)} nodes in flight"
                )
            slot = self.prefix_len
            self.prefix_len += 1
            return RowContext(slot, list(range(slot + 1)))
        chain = self._ancestor_slots(row.parent_id)
        if row.position != self.prefix_len + len(chain):
            raise ProtocolError(
                f"node {row.node_id} at position {row.position} does not follow its ancestors "
                f"(prefix {self.prefix_len}, {len(chain)} in-flight ancestors)"
            )
        slot = self.used
        self.inflight.append(row.node_id)
        self.parent[row.node_id] = row.parent_id
        context = RowContext(slot, list(range(self.prefix_len)) + chain + [slot])
        self.promote()  # a node accepted before it reached this stage joins the prefix at once
        return context

    def _ancestor_slots(self, parent_id: int) -> list[int]:
        """Slots of the in-flight ancestors of a node with this parent, oldest first."""
        chain = []
        node = parent_id
        while node != ROOT_PARENT:
            slot = self.slot_of(node)
            if slot is None:  # the parent is committed: the chain ends at the prefix
                break
            chain.append(slot)
            node = self.parent[node]
        chain.reverse()
        return chain

    def prune(self, node_ids: set[int]) -> None:
        """Drop pruned nodes and compact the in-flight region in place."""
        self.accepted -= node_ids
        keep = [i for i, n in enumerate(self.inflight) if n not in node_ids]
        if len(keep) == len(self.inflight):
            return
        src = torch.tensor([self.prefix_len + i for i in keep], dtype=torch.long, device=self.k.device)
        dst = slice(self.prefix_len, self.prefix_len + len(keep))
        self.k[:, dst] = self.k[:, src]  # advanced indexing copies before the write
        self.v[:, dst] = self.v[:, src]
        for n in set(self.inflight) - {self.inflight[i] for i in keep}:
            self.parent.pop(n, None)
        self.inflight = [self.inflight[i] for i in keep]

    def commit(self, node_ids: set[int]) -> None:
        """Mark nodes accepted; promote the oldest in-flight nodes that are."""
        self.accepted |= node_ids
        self.promote()

    def promote(self) -> None:
        while self.inflight and self.inflight[0] in self.accepted:
            node = self.inflight.pop(0)
            self.accepted.discard(node)
            self.parent.pop(node, None)
            self.prefix_len += 1


@dataclass(frozen=True)
class KVUse:
    """How much of a stage's KV budget its requests hold, in slots (vLLM's kv_cache_usage_perc, here).

    A slot is one position's K and V in every layer of the stage (2 x layers x kv_heads x head_dim values). The
    cache does not grow with the text: `allocate` reserves a request's whole capacity (its prompt, max_tokens
    and the speculative nodes it may have in flight) when the request is admitted, and frees it only when the
    request leaves. So the unit that is really allocated is a request's reservation, and usage is
    reserved / budget, where the budget is the scheduler's --kv-slots (the slots each stage may hold, which its
    admission never exceeds). That is vLLM's meaning, the fraction of KV blocks held by requests, with a whole
    request's reservation as the block. A stage may briefly hold more than the budget (it registers the
    requests of a step before it applies the finish events of the requests they replace), so it is capped at 1.
    `filled` counts the slots that hold KV now: filled / reserved is how much of the reservations is used.
    """

    requests: int  # requests this stage holds KV for
    reserved: int  # slots allocated to them
    filled: int  # slots of them holding KV (committed prefix and in-flight nodes)
    budget: int  # slots the stage may hold (the scheduler's --kv-slots); 0: not known

    @property
    def fraction(self) -> float:
        """reserved / budget in [0, 1] (0 when the budget is not known)."""
        return min(self.reserved / self.budget, 1.0) if self.budget > 0 else 0.0


def kv_use(caches: Iterable[RequestKV], budget: int) -> KVUse:
    """The slots the caches reserve and fill, against `budget` slots."""
    caches = list(caches)
    return KVUse(len(caches), sum(c.capacity for c in caches), sum(c.used for c in caches), budget)


def allocate(num_layers: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device | str = "cpu") -> RequestKV:
    shape = (num_layers, capacity, kv_heads, head_dim)
    return RequestKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
