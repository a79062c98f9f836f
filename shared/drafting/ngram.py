"""Prompt-lookup speculation: continue the longest suffix n-gram seen earlier.

For a node, the context is the accepted text followed by the node's
speculative path. The longest suffix (max_n down to min_n tokens) that also
occurs earlier in the context is looked up; the tokens that followed its
occurrences are proposed, scored by their frequency (log of the share).

`propose` scans the context: O(context) Python per lookup, 16 requests of a
long prompt cost milliseconds a step. `expand` gives the same proposals from
each request's follower counts (every n-gram of its accepted text, counted
once as the text grows), and scans only the few occurrences that reach into
the node's speculative path.

Where a request's own text holds no suffix of the context, the lookup falls back on a table shared across
requests (`shared_tokens` > 0): the followers of every n-gram in the accepted text of the requests that finished
last, up to `shared_tokens` tokens of them (SuffixDecoding's global tree, Oliaro et al. 2024, as counts). Chat
templates and the model's own turns of phrase recur across requests. Lossless like any draft (the target
verifies); what one request's text proposes to another shows only in its timing, as a shared prefix cache's does.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

from shared.types.batch import PipelineEvent
from shared.types.config import check_ngram_shared
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


@dataclass
class _Followers:
    """The tokens that followed each n-gram (min_n..max_n tokens) of a request's accepted text, in the order
    they first did (a lookup's ties go as the scan's would), counted as the text grows."""

    min_n: int
    max_n: int
    text: list[int] = field(default_factory=list)
    counts: dict[tuple[int, ...], Counter[int]] = field(default_factory=dict)

    def grow(self, text: list[int]) -> None:
        """Count what `text` adds to the text counted (one that does not extend it is counted afresh)."""
        if len(text) < len(self.text) or text[: len(self.text)] != self.text:
            self.text, self.counts = [], {}
        for key, follower in _ngrams(text, len(self.text), self.min_n, self.max_n):
            _followers_of(self.counts, key)[follower] += 1
        self.text = list(text)


def _ngrams(text: list[int], start: int, min_n: int, max_n: int):
    """(n-gram, the token after it): every n-gram of min_n..max_n tokens followed by a token at index >= start."""
    for j in range(start, len(text)):  # the follower at j, of the n tokens before it
        for n in range(min_n, min(max_n, j) + 1):
            yield tuple(text[j - n : j]), text[j]


def _followers_of(counts: dict[tuple[int, ...], Counter[int]], key: tuple[int, ...]) -> Counter[int]:
    """counts[key], made empty where missing (not setdefault's: that builds a Counter for every n-gram counted)."""
    follow = counts.get(key)
    if follow is None:
        follow = counts[key] = Counter()
    return follow


@dataclass
class _Shared:
    """The followers of every n-gram (min_n..max_n tokens) of the texts added, until they hold more than
    `capacity` tokens: then the oldest texts' counts are taken out again. A text longer than the table is not
    kept (capacity 0: the table stays empty)."""

    min_n: int
    max_n: int
    capacity: int
    texts: deque[list[int]] = field(default_factory=deque)
    tokens: int = 0
    counts: dict[tuple[int, ...], Counter[int]] = field(default_factory=dict)

    def add(self, text: list[int]) -> None:
        if not 1 < len(text) <= self.capacity:
            return
        self._count(text, 1)
        self.texts.append(text)
        self.tokens += len(text)
        while self.tokens > self.capacity:
            old = self.texts.popleft()
            self.tokens -= len(old)
            self._count(old, -1)

    def _count(self, text: list[int], sign: int) -> None:
        for key, follower in _ngrams(text, 0, self.min_n, self.max_n):
            follow = _followers_of(self.counts, key)
            follow[follower] += sign
            if follow[follower] <= 0:
                del follow[follower]
                if not follow:
                    del self.counts[key]

    def lookup(self, tail: list[int], k: int) -> Proposals:
        """The followers of the longest suffix of `tail` (its last max_n tokens) the table holds."""
        for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
            if follow := self.counts.get(tuple(tail[-n:])):
                return _scored(follow, k)
        return []


class NgramSource:
    name = "ngram"
    computed_rows = 0  # a lookup: no forward

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096, shared_tokens: int = 0):
        check_ngram_shared(shared_tokens)
        self.max_n, self.min_n, self.window = max_n, min_n, window
        self.mirrors: dict[str, _Mirror] = {}
        self.followers: dict[str, _Followers] = {}
        self.shared = _Shared(min_n, max_n, shared_tokens)  # finished requests' text: the lookup's fallback

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None:
        self.mirrors[request_id] = _Mirror()

    def prefill(self, request_id: str, prompt: list[int]) -> int:
        return 0  # the lookup reads the text when asked

    def expand(self, jobs: list[ExpansionJob]) -> list[tuple[str, int, Proposals]]:
        out = []
        for job in jobs:
            mirror = self.mirrors.setdefault(job.request_id, _Mirror())
            followers = self.followers.setdefault(job.request_id, _Followers(self.min_n, self.max_n))
            followers.grow(job.text)
            for ref in job.nodes:
                if not ref.accepted:
                    mirror.nodes[ref.node_id] = (ref.parent_id, ref.token, ref.position)
                if ref.accepted and ref.position + 1 < len(job.text):  # a node behind the text's end: scan
                    context = job.text[: ref.position + 1]
                    tail = context[-self.max_n :]
                    proposals = self.propose(context, job.top_k)
                else:
                    path = [] if ref.accepted else mirror.path(ref.node_id, len(job.text))
                    tail = (followers.text[-self.max_n :] + path)[-self.max_n :]
                    proposals = self._lookup(followers, path, job.top_k)
                out.append((job.request_id, ref.node_id, proposals or self.shared.lookup(tail, job.top_k)))
        return out

    def propose(self, context: list[int], k: int) -> Proposals:
        """The lookup by scanning `context` (the reference `expand` keeps to)."""
        context = context[-self.window :]
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            suffix = context[-n:]
            follow = Counter(
                context[i + n] for i in range(len(context) - n) if context[i : i + n] == suffix
            )
            if follow:
                return _scored(follow, k)
        return []

    def _lookup(self, followers: _Followers, path: list[int], k: int) -> Proposals:
        """propose(followers.text + path, k), from the counts: the occurrences whose follower lies in the
        text are counted already; those whose follower lies in the path are scanned."""
        text = followers.text
        size = len(text) + len(path)  # of the context, never built: a copy of the text per node is what the
        if size > self.window:  # counts save (they do not know the window: scan)
            return self.propose(text + path, k)
        tail = text[-self.max_n :] + path  # all a lookup reads beyond the counts
        skip = len(text) - (len(tail) - len(path))  # the context's index of tail[0]
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            suffix = tuple(tail[-n:])
            follow = Counter(followers.counts.get(suffix, ()))  # followers in the text, in first-seen order
            for j in range(max(len(text), n) - skip, size - skip):  # followers in the path (tail's indices)
                if tuple(tail[j - n : j]) == suffix:
                    follow[tail[j]] += 1
            if follow:
                return _scored(follow, k)
        return []

    def apply(self, events: list[PipelineEvent]) -> None:
        for event in events:
            mirror = self.mirrors.get(event.request_id)
            if mirror is None:
                continue
            if event.kind == "finish":
                del self.mirrors[event.request_id]
                if (followers := self.followers.pop(event.request_id, None)) is not None:
                    self.shared.add(followers.text)  # its text as its last job saw it
            elif event.kind == "prune":
                for n in event.node_ids:
                    mirror.nodes.pop(n, None)


def _scored(follow: Counter[int], k: int) -> Proposals:
    """The k most frequent followers (ties: first seen first), scored by the log of their share."""
    total = sum(follow.values())
    return [(tok, math.log(c / total)) for tok, c in follow.most_common(k)]
