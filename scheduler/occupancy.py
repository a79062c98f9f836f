"""Stage x step occupancy: what each stage computed at each step, and what became of it.

Pure bookkeeping from what the scheduler already knows (no transport, no torch):
in lockstep, stage s at step t computes the micro-batch stage 0 received at
step t - s, less the rows pruned by verifications before step t. A row's fate
is known by the step it leaves the last stage (its parent's target token has
arrived by then), so column t is final after step t + N - 1's verification.

Fates (see shared/types/batch.py's glossary):
  useful   a committed row (prompt, first token, bonus: the work plain PP does)
           or a speculative node that was later accepted
  wasted   a speculative node that was later pruned, or whose request finished first
An empty cell is a pipeline bubble. A column is
    {"step": t, "stages": [[[request_id, useful, wasted], ...] per stage]}
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shared.types.batch import PipelineEvent, Row

Column = dict  # {"step": int, "stages": list[list[list]]}


@dataclass
class OccupancyTotals:
    """Cumulative counts over finalized columns (the per-stage busy fraction and the waste)."""

    steps: int = 0
    busy: list[int] | None = None  # per stage: steps with a non-empty micro-batch
    useful: int = 0  # rows computed, summed over stages
    wasted: int = 0

    def busy_fraction(self) -> list[float]:
        return [b / self.steps if self.steps else 0.0 for b in self.busy or []]


class Occupancy:
    def __init__(self, stages: int, keep: int = 64):
        self.stages = stages
        self.inflight: list[list[Row]] = [[] for _ in range(stages - 1)]  # input of stage s + 1
        self.pending: deque[tuple[int, list[list[Row]]]] = deque()  # columns whose fates are not all known
        self.fate: dict[tuple[str, int], tuple[bool, int]] = {}  # (request, node) -> (accepted?, step decided)
        self.columns: deque[Column] = deque(maxlen=keep)  # the last finalized columns, oldest first
        self.totals = OccupancyTotals(busy=[0] * stages)

    def record(self, step: int, sent: list[Row], events: list[PipelineEvent]) -> list[Column]:
        """Stage 0 got `sent` at `step`; `events` came out of that step's verification.

        Returns the columns that became final at this step.
        """
        column = [list(sent), *self.inflight]  # [stages][rows]
        self.pending.append((step, column))
        pruned: dict[str, set[int]] = {}
        finished: set[str] = set()
        for event in events:
            if event.kind == "commit":
                self.fate.update({(event.request_id, n): (True, step) for n in event.node_ids})
            elif event.kind == "prune":
                self.fate.update({(event.request_id, n): (False, step) for n in event.node_ids})
                pruned.setdefault(event.request_id, set()).update(event.node_ids)
            elif event.kind == "finish":
                finished.add(event.request_id)
        self.inflight = [
            [r for r in rows if r.request_id not in finished and r.node_id not in pruned.get(r.request_id, ())]
            for rows in column[:-1]
        ]
        done = []
        while self.pending and self.pending[0][0] <= step - (self.stages - 1):
            done.append(self._finalize(*self.pending.popleft()))
        return done

    def flush(self) -> list[Column]:
        """The pipe is empty (no active request): every pending column is final now."""
        self.inflight = [[] for _ in self.inflight]
        done = [self._finalize(*self.pending.popleft()) for _ in range(len(self.pending))]
        self.fate.clear()
        return done

    def _finalize(self, step: int, column: list[list[Row]]) -> Column:
        stages = []
        for rows in column:
            cells: dict[str, list[int]] = {}
            for r in rows:
                useful = r.committed or self.fate.get((r.request_id, r.node_id), (False, 0))[0]
                cells.setdefault(r.request_id, [0, 0])[0 if useful else 1] += 1
            stages.append([[rid, u, w] for rid, (u, w) in cells.items()])
        self._forget_fates()
        self._count(stages)
        out = {"step": step, "stages": stages}
        self.columns.append(out)
        return out

    def _forget_fates(self) -> None:
        """A row in pending column c was sent at step >= c - N + 1, and no fate is decided before sending."""
        if not self.pending:
            self.fate.clear()
            return
        oldest = self.pending[0][0] - self.stages + 1
        self.fate = {key: v for key, v in self.fate.items() if v[1] >= oldest}

    def _count(self, stages: list[list[list]]) -> None:
        t = self.totals
        t.steps += 1
        for s, cells in enumerate(stages):
            t.busy[s] += bool(cells)
            t.useful += sum(c[1] for c in cells)
            t.wasted += sum(c[2] for c in cells)
