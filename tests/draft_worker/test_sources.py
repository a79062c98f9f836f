"""Speculative token sources: prompt-lookup n-grams, and the draft model's re-rooted tree KV cache.

The draft model never recomputes a path: commit events re-root its cache and prune events
compact it. The test below records every proposal it made while a real pipeline ran
(accepts, misses, prunes, refills), then asks a fresh source, with nothing cached, for the
same node's children by computing its whole path from scratch: tokens and log-probabilities
must be bit-identical (the forward is row-invariant, so the cache is the only thing that
could differ).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from draft_worker.draft_model import DraftModelSource
from draft_worker.load import load_draft
from draft_worker.vocab import head_tokens
from scheduler.scheduler import Phase, Request
from shared.compute.runner import StageRunner
from shared.compute.weights import load_stage_weights
from shared.drafting.ngram import NgramSource
from shared.types.batch import PipelineEvent
from shared.types.config import ModelArch, SamplingParams
from shared.types.errors import ConfigError
from shared.types.speculation import ExpansionJob, NodeRef
from specpipe.executor import DraftLane
from tests.helpers import generate, pipeline

pytestmark = pytest.mark.unit

TINY_PROMPT = [5, 17, 99, 3, 5, 17, 42, 7, 5, 17, 99, 3]

# label: (context, k, expected proposals as (token, probability))
NGRAM = {
    "longest suffix wins": ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2, [(9, 1.0)]),
    "shorter suffix when the long one is new": ([4, 5, 6, 4, 5, 8, 6], 2, [(4, 1.0)]),
    "frequency decides the order": ([7, 1, 7, 2, 7, 1, 3, 7], 2, [(1, 2 / 3), (2, 1 / 3)]),
    "top k cuts": ([7, 1, 7, 2, 7, 1, 3, 7], 1, [(1, 2 / 3)]),
    "nothing seen before": ([1, 2, 3, 4], 3, []),
    "single token": ([1], 3, []),
}


@pytest.mark.parametrize("case", list(NGRAM))
def test_ngram_proposes_what_followed_the_suffix(case) -> None:
    context, k, expected = NGRAM[case]
    got = NgramSource().propose(context, k)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [lp for _, lp in got] == pytest.approx([math.log(p) for _, p in expected])


def test_ngram_follows_the_speculative_path_and_forgets_pruned_nodes() -> None:
    source = NgramSource()
    source.add_request("r", [1, 2, 3, 1], capacity=64)
    # node 10 speculates token 2 after the accepted text [1, 2, 3, 1]: context [1, 2, 3, 1, 2] -> 3 followed "1 2"
    job = ExpansionJob("r", [1, 2, 3, 1], [NodeRef(10, -1, 2, 4, False)], top_k=2)
    assert source.expand([job]) == [("r", 10, [(3, 0.0)])]
    source.apply([PipelineEvent("r", "prune", (10,))])
    assert 10 not in source.mirrors["r"].nodes
    source.apply([PipelineEvent("r", "finish")])
    assert "r" not in source.mirrors


def _served(source: NgramSource, request_id: str, text: list[int], node: int) -> list[tuple[int, float]]:
    """The proposals for the last accepted token of `text`, as a request's job gets them; then it finishes."""
    source.add_request(request_id, text, capacity=64)
    ((_, _, proposals),) = source.expand([ExpansionJob(request_id, text, [NodeRef(node, -1, text[-1],
                                                                                   len(text) - 1, True)], 2)])
    source.apply([PipelineEvent(request_id, "finish")])
    return proposals


# label: (shared_tokens, earlier requests' texts, a later request's text, its proposals as (token, probability))
SHARED = {
    "off: nothing shared": (0, [[1, 2, 3, 4]], [9, 2, 3], []),
    "an earlier request's followers, longest suffix first": (64, [[1, 2, 3, 4], [5, 3, 6]], [9, 2, 3], [(4, 1.0)]),
    "counted over the requests": (64, [[5, 3, 6], [7, 3, 8], [3, 6]], [9, 9, 3], [(6, 2 / 3), (8, 1 / 3)]),
    "the request's own text first": (64, [[1, 2, 3, 4]], [2, 3, 7, 9, 2, 3], [(7, 1.0)]),
    "the oldest text leaves the table": (6, [[1, 2, 3, 4], [5, 6, 7, 8]], [9, 2, 3], []),
    "a text longer than the table is not kept": (3, [[1, 2, 3, 4]], [9, 2, 3], []),
}


@pytest.mark.parametrize("case", list(SHARED))
def test_ngram_falls_back_on_the_text_of_requests_that_finished(case) -> None:
    capacity, earlier, text, expected = SHARED[case]
    source = NgramSource(shared_tokens=capacity)
    for i, old in enumerate(earlier):
        _served(source, f"old-{i}", old, 100 + i)
    got = _served(source, "new", text, 1)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [lp for _, lp in got] == pytest.approx([math.log(p) for _, p in expected])


def test_ngram_shared_counts_are_those_of_the_texts_it_keeps() -> None:
    """Texts that leave the table take their counts with them: what remains is a table of the texts kept."""
    rng = random.Random(7)
    texts = [[rng.randrange(5) for _ in range(rng.randrange(2, 30))] for _ in range(40)]
    source = NgramSource(shared_tokens=100)
    for text in texts:
        source.shared.add(text)
    kept = NgramSource(shared_tokens=1 << 20)
    for text in source.shared.texts:
        kept.shared.add(text)
    assert source.shared.counts == kept.shared.counts and source.shared.tokens <= 100
    assert source.shared.tokens == sum(len(t) for t in source.shared.texts)


# label: (vocabulary size, accepted text length, speculative path length, window)
LOOKUPS = {
    "few tokens, many repeats": (3, 60, 3, 4096),
    "a wider vocabulary": (12, 200, 4, 4096),
    "no path (an accepted node)": (4, 80, 0, 4096),
    "a deep path over two tokens (n-grams across the text's end)": (2, 60, 10, 4096),
    "longer than the window (scanned)": (3, 90, 2, 50),
}


@pytest.mark.parametrize("case", list(LOOKUPS))
def test_ngram_counts_give_what_the_scan_gives(case) -> None:
    """expand reads each request's follower counts (grown with its text, step after step) and scans only what
    reaches into the node's path: the proposals are the scan's (propose), order of ties included."""
    vocab, length, depth, window = LOOKUPS[case]
    rng = random.Random(case)
    text = [rng.randrange(vocab) for _ in range(length)]
    source = NgramSource(window=window)
    source.add_request("r", text[:8], capacity=1024)
    for cut in range(8, length + 1, 7):  # the accepted text grows between jobs
        accepted, parent, refs, path = text[:cut], -1, [], []
        for d in range(depth):  # a chain of speculative nodes below the text
            token = rng.randrange(vocab)
            refs.append(NodeRef(1000 * cut + d, parent, token, cut + d, False))
            parent, path = 1000 * cut + d, [*path, token]
        refs = refs or [NodeRef(cut, -1, accepted[-1], cut - 1, True)]
        got = source.expand([ExpansionJob("r", accepted, refs, top_k=3)])
        for (_, node, proposals), ref in zip(got, refs):
            context = accepted + path[: ref.position - cut + 1] if not ref.accepted else accepted
            assert proposals == source.propose(context, 3), (case, cut, node)
    text[3] = vocab  # a text that does not extend the one counted is counted afresh
    job = ExpansionJob("r", text, [NodeRef(1, -1, text[-1], len(text) - 1, True)], top_k=3)
    assert source.expand([job])[0][2] == source.propose(text, 3)


class Recorder:
    """Wraps a source: keeps every (job text, node path, proposals) it answered."""

    def __init__(self, source: DraftModelSource):
        self.source = source
        self.nodes: dict[int, tuple[int, int]] = {}  # speculative node -> (parent, token)
        self.seen: list[tuple[list[int], list[tuple[int, float]]]] = []

    @property
    def computed_rows(self) -> int:
        return self.source.computed_rows

    def add_request(self, request_id, prompt, capacity) -> None:
        self.source.add_request(request_id, prompt, capacity)

    def apply(self, events) -> None:
        self.source.apply(events)

    def expand(self, jobs):
        out = self.source.expand(jobs)
        paths = {}
        for job in jobs:
            for ref in job.nodes:
                if not ref.accepted:
                    self.nodes[ref.node_id] = (ref.parent_id, ref.token)
                paths[ref.node_id] = job.text[: ref.position + 1] if ref.accepted else self._path(job, ref)
        self.seen += [(paths[node_id], proposals) for _, node_id, proposals in out]
        return out

    def _path(self, job: ExpansionJob, ref: NodeRef) -> list[int]:
        tokens, node = [], ref.node_id
        while len(job.text) + len(tokens) <= ref.position:
            parent, token = self.nodes[node]
            tokens.append(token)
            node = parent
        return job.text + tokens[::-1]


def _fresh_source(model_dir) -> DraftModelSource:
    arch = ModelArch.from_model_dir(model_dir)
    return DraftModelSource(StageRunner(arch, load_stage_weights(model_dir, arch, 0, arch.num_layers, torch.float32)))


@pytest.mark.parametrize("policy,stages", [("specpipe", 4), ("tree", 2)], ids=["specpipe-N4", "tree-N2"])
def test_draft_cache_gives_the_proposals_of_recomputing_from_scratch(tiny_dir, policy, stages) -> None:
    pipe = pipeline(tiny_dir, policy, stages, draft=str(tiny_dir), width=3)
    recorder = Recorder(pipe.draft)
    pipe.draft = recorder
    state = generate(pipe, TINY_PROMPT, 24)
    assert state.stats.accepted > 0 and len(recorder.seen) > 30  # it speculated, and some of it was pruned
    fresh = _fresh_source(tiny_dir)
    for i, (path, proposals) in enumerate(recorder.seen[::3]):
        rid = f"fresh-{i}"
        fresh.add_request(rid, path[:-1], capacity=len(path) + 8)
        job = ExpansionJob(rid, path, [NodeRef(0, -1, path[-1], len(path) - 1, True)], top_k=len(proposals))
        assert fresh.expand([job]) == [(rid, 0, proposals)], f"proposal {3 * i} differs from recomputing its path"
        fresh.apply([PipelineEvent(rid, "finish")])


# label: (n, end-of-sequence ids, expected tokens) over tiny-random's 49,152
HEAD_TOKENS = {
    "the first n, and an end of sequence past them": (300, (2, 40000), [*range(300), 40000]),
    "an end of sequence among the first n": (300, (2,), list(range(300))),
    "n past the vocabulary: every token": (60000, (2,), list(range(49152))),
    "fewer than the least refused": (100, (2,), ConfigError),
    "a negative count refused": (-1, (2,), ConfigError),
}


@pytest.mark.parametrize("case", list(HEAD_TOKENS))
def test_head_tokens_are_the_first_ids_and_the_ends_of_sequence(tiny_dir, case) -> None:
    n, eos, expected = HEAD_TOKENS[case]
    arch = replace(ModelArch.from_model_dir(tiny_dir), eos_token_ids=eos)
    if expected is ConfigError:
        with pytest.raises(ConfigError, match="at least 256"):
            head_tokens(arch, n)
    else:
        assert head_tokens(arch, n).tolist() == expected


def test_a_subset_head_proposes_its_best_tokens_under_their_own_ids(tiny_dir) -> None:
    """Scoring 3,000 frequent tokens and each request's own, the draft proposes what the whole head ranks best
    among them, under the tokens' ids (not the columns' numbers), with log-probabilities normalised over them.
    Two requests share the forward: one with rare tokens of its own, one without."""
    arch = ModelArch.from_model_dir(tiny_dir)
    full, subset = _fresh_source(tiny_dir), load_draft(str(tiny_dir), arch, None, torch.float32, vocab=3000)
    frequent = set(head_tokens(arch, 3000).tolist())
    texts = {"rare": [*TINY_PROMPT, 4000, 9, 3100, 4000], "plain": TINY_PROMPT}  # 4000 twice: one column
    allowed = {"rare": frequent | {4000, 3100}, "plain": frequent}
    for source in (full, subset):
        for rid, text in texts.items():
            source.add_request(rid, text[:-1], capacity=len(text) + 8)
    # per request: its last accepted token and two speculative children of it, rows of one forward
    nodes = lambda text: [NodeRef(0, -1, text[-1], len(text) - 1, True), NodeRef(1, 0, 9, len(text), False),
                          NodeRef(2, 0, 4000, len(text), False)]
    jobs = lambda k: [ExpansionJob(rid, text, nodes(text), top_k=k(rid)) for rid, text in texts.items()]
    whole = {(rid, node): props for rid, node, props in full.expand(jobs(lambda rid: arch.vocab_size))}
    got = {(rid, node): props for rid, node, props in subset.expand(jobs(lambda rid: len(allowed[rid])))}
    assert len(got) == 6
    for (rid, node), proposals in got.items():
        ranked = [(t, lp) for t, lp in whole[rid, node] if t in allowed[rid]]
        norm = torch.logsumexp(torch.tensor([lp for _, lp in ranked], dtype=torch.float64), 0).item()
        assert [t for t, _ in proposals[:10]] == [t for t, _ in ranked[:10]], (rid, node)  # the best, in order
        assert dict(proposals) == pytest.approx({t: lp - norm for t, lp in ranked}, abs=1e-4), (rid, node)
    assert subset.subset.own["rare"][1] == [4000, 3100] and subset.subset.own["plain"][1] == []
    subset.apply([PipelineEvent("rare", "finish")])
    assert "rare" not in subset.subset.own


def test_the_executor_records_the_rows_the_draft_computed(tiny_dir) -> None:
    """A modeled clock charges the draft for what it computed: its first forward catches up on the prompt (and the
    first token), not only the node it was asked to expand; a lookup computes nothing."""
    pipe = pipeline(tiny_dir, "specpipe", 2, draft=str(tiny_dir), width=2)
    pipe.trace_enabled = True
    generate(pipe, TINY_PROMPT, 8)
    first = next(t.draft_rows for t in pipe.trace if t.draft_rows)
    assert first[0] == len(TINY_PROMPT) + 1  # the prompt and the first token, fed as committed rows
    assert NgramSource().computed_rows == 0


@pytest.mark.parametrize("source", ["draft model", "ngram"])
def test_a_draft_beside_the_pipe_drafts_the_prompt_at_admission(tiny_dir, source) -> None:
    """Unwaited (DraftLane), the draft model computes the prompt when the request is admitted, while the target
    prefills it, so its first expansion is the first token alone; each level enters once its forward (1.5 steps
    here, on 4 stages) has ended, so a level every other step, and the tokens are plain decoding's."""
    draft = str(tiny_dir) if source == "draft model" else "ngram"
    forwards: list[int] = []
    pipe = pipeline(tiny_dir, "specpipe", 4, draft=draft, width=2, draft_waits=False)
    pipe.lane = DraftLane(lambda rows, context: forwards.append(rows) or 1.5)
    state = pipe.submit(Request("r", tuple(TINY_PROMPT), SamplingParams(), 12))
    while state.phase is not Phase.DONE:
        pipe.step()
        pipe.lane.now += 1.0  # the driver's clock: a step takes 1 s
    assert state.output == generate(pipeline(tiny_dir, "pp", 4), TINY_PROMPT, 12).output
    assert forwards[:2] == ([len(TINY_PROMPT), 1] if source == "draft model" else [0, 0])
    if source == "draft model":  # tiny-random drafts itself: every level it got in time was accepted
        decode_steps = state.stats.last_token_step - state.stats.first_decode_step
        assert 0 < state.stats.drafts <= decode_steps / 2 and state.stats.accepted > 0
