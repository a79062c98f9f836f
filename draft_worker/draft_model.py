"""A draft LM as speculative source, with its own tree KV cache.

The draft runs the same row-invariant forward as the target (a StageRunner
holding all of the draft's layers). Its cache mirrors the tree: speculative
nodes it expanded stay in flight, commit events re-root it (accepted nodes
become prefix) and prune events compact it, so no path is recomputed. Tokens
the draft never computed (a bonus token, an accepted leaf it was never asked
to expand, the prompt) are fed as committed rows just before they are needed.
Its LM head may score part of the vocabulary (draft_worker/vocab.py).
"""

from __future__ import annotations

import torch

from draft_worker.vocab import SubsetHead
from shared.compute.runner import RequestInfo, StageRunner
from shared.types.batch import MicroBatch, PipelineEvent, Row
from shared.types.config import SamplingParams
from shared.types.speculation import ExpansionJob, NodeRef, Proposals


class DraftModelSource:
    name = "draft-model"

    def __init__(self, runner: StageRunner, subset: SubsetHead | None = None):
        if not (runner.is_first and runner.is_last):
            raise ValueError("the draft runner must hold the whole draft model")
        self.runner = runner
        self.subset = subset  # the runner's LM head scores part of the vocabulary: what its columns mean
        self.computed_rows = 0  # of the last expand: the nodes and the committed rows fed before them

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None:
        # prompt_len 0: every row in the same GEMM tiles, whatever text the draft first saw (a cache and a
        # recompute from scratch then give the same proposals); the draft never draws seeded targets
        self.runner.add_request(request_id, RequestInfo(0, SamplingParams()), capacity)

    def prefill(self, request_id: str, prompt: list[int]) -> int:
        """The prompt as committed rows now, so that the first expansion need not catch up on it."""
        start = self.runner.kv[request_id].prefix_len
        rows = _committed(request_id, prompt, start, len(prompt))
        if rows:
            self.runner.hidden(MicroBatch(-1, rows))  # [n, H], only its KV is kept
        return len(rows)

    def expand(self, jobs: list[ExpansionJob]) -> list[tuple[str, int, Proposals]]:
        rows, asked, top_k = [], [], {}
        for job in jobs:
            top_k[job.request_id] = job.top_k
            for ref in job.nodes:
                rows.extend(self._rows_for(job, ref))
                asked.append((job.request_id, ref.node_id, len(rows) - 1))
        self.computed_rows = len(rows)
        if not rows:
            return []
        hidden = self.runner.hidden(MicroBatch(-1, rows))  # [n, H]
        x = hidden[torch.tensor([i for _, _, i in asked], device=hidden.device)]  # [m, H]
        logits = self.runner.logits(x)  # [m, V], or [m, N] over a subset
        if self.subset is not None:
            for job in jobs:
                self.subset.read(job.request_id, job.text)
            logits, ids = self.subset.widen(x, logits, [rid for rid, _, _ in asked])  # [m, N + E] each
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # fp32 scores
        values, tokens = torch.topk(logprobs, max(top_k.values()))  # [m, k] each, best first: one copy to the host
        if self.subset is not None:
            tokens = ids.gather(1, tokens)  # columns -> token ids
        values, tokens = values.tolist(), tokens.tolist()
        return [(rid, node_id, list(zip(tokens[j][: top_k[rid]], values[j][: top_k[rid]])))
                for j, (rid, node_id, _) in enumerate(asked)]

    def _rows_for(self, job: ExpansionJob, ref: NodeRef) -> list[Row]:
        rid = job.request_id
        if not ref.accepted:
            return [Row(rid, ref.node_id, ref.parent_id, ref.position, ref.token, False, False)]
        cache = self.runner.kv[rid]
        cache.accepted.clear()  # anything accepted but never computed here is now fed below
        node = Row(rid, ref.node_id, ref.parent_id, ref.position, ref.token, True, False)
        return [*_committed(rid, job.text, cache.prefix_len, ref.position), node]

    def apply(self, events: list[PipelineEvent]) -> None:
        self.runner.apply(events)
        if self.subset is not None:
            for event in events:
                if event.kind == "finish":
                    self.subset.forget(event.request_id)


def _committed(request_id: str, text: list[int], start: int, end: int) -> list[Row]:
    """text[start:end] as committed rows (numbered as the stages number a prompt's rows)."""
    return [Row(request_id, -(p + 2), -(p + 1), p, text[p], True, False) for p in range(start, end)]
