"""Unit tests of scheduler.tree.TokenTree: example tables plus a hypothesis state machine.

The state machine drives TokenTree the way the scheduler does (accepted roots and
bonus tokens, drafted proposals, levels picked by best_children and marked sent,
accepting a child, pruning whole subtrees, forgetting accepted ancestors) and
checks the structural invariants after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.tree import Status, TokenTree
from shared.types.batch import ROOT_PARENT

pytestmark = pytest.mark.unit


def _root_with_children(scores: list[float], root_pos: int = 10) -> tuple[TokenTree, int, list[int]]:
    """An accepted root with one drafted child per score (tokens 100, 101, ...)."""
    tree = TokenTree()
    root = tree.add_accepted(7, ROOT_PARENT, root_pos).node_id
    kids = tree.add_proposals(root, [(100 + i, s) for i, s in enumerate(scores)])
    return tree, root, kids


# --------------------------------------------------------------------------- add_accepted / add_proposals


def test_add_accepted_root_and_child() -> None:
    tree = TokenTree()
    root = tree.add_accepted(5, ROOT_PARENT, 3)
    assert (root.node_id, root.token, root.parent, root.position, root.score) == (0, 5, ROOT_PARENT, 3, 0.0)
    assert root.status is Status.ACCEPTED and root.children == [] and not root.expanded
    bonus = tree.add_accepted(9, root.node_id, 4)
    assert bonus.node_id == 1 and bonus.parent == root.node_id
    assert tree[root.node_id].children == [bonus.node_id]
    assert 1 in tree and 2 not in tree


@pytest.mark.parametrize(
    ("existing", "proposals", "added_tokens", "added_scores"),
    [
        ([], [(5, -0.1), (6, -0.2)], [5, 6], [-0.1, -0.2]),
        ([], [(5, -0.1), (5, -0.3), (6, -0.2)], [5, 6], [-0.1, -0.2]),
        ([5], [(5, -0.1), (7, -0.4)], [7], [-0.4]),
        ([5, 6], [(6, -0.1), (5, -0.2)], [], []),
        ([], [], [], []),
    ],
    ids=["fresh", "repeat_within_call_keeps_first", "skips_existing_child", "all_existing", "empty_marks_expanded"],
)
def test_add_proposals_dedups(existing, proposals, added_tokens, added_scores) -> None:
    tree = TokenTree()
    root = tree.add_accepted(1, ROOT_PARENT, 4).node_id
    if existing:
        tree.add_proposals(root, [(t, -1.0) for t in existing])
    before = list(tree[root].children)
    added = tree.add_proposals(root, proposals)
    assert [tree[n].token for n in added] == added_tokens
    assert [tree[n].score for n in added] == pytest.approx(added_scores)
    assert tree[root].expanded
    assert tree[root].children == before + added
    for n in added:
        assert tree[n].parent == root and tree[n].position == 5 and tree[n].status is Status.DRAFTED
    tokens = [tree[c].token for c in tree[root].children]
    assert len(tokens) == len(set(tokens))


def test_add_proposals_accumulates_scores_down_the_path() -> None:
    tree = TokenTree()
    root = tree.add_accepted(1, ROOT_PARENT, 0).node_id
    (a,) = tree.add_proposals(root, [(2, -0.5)])
    (b,) = tree.add_proposals(a, [(3, -0.25)])
    (c,) = tree.add_proposals(b, [(4, -1.0)])
    assert [tree[n].score for n in (a, b, c)] == [-0.5, -0.75, -1.75]
    assert [tree[n].position for n in (a, b, c)] == [1, 2, 3]


def test_add_proposals_of_a_missing_parent_raises() -> None:
    tree = TokenTree()
    with pytest.raises(KeyError):
        tree.add_proposals(42, [(1, -0.1)])


# --------------------------------------------------------------------------- best_children


@pytest.mark.parametrize(
    ("scores", "width", "expected"),
    [
        ([-1.0, -0.5, -2.0], 2, [0, 1]),
        ([-1.0, -0.5, -2.0], 1, [1]),
        ([-1.0, -0.5, -2.0], 5, [0, 1, 2]),
        ([-3.0, -1.0, -2.0, -0.1], 2, [1, 3]),
        ([-1.0, -1.0, -1.0], 2, [0, 1]),
        ([], 3, []),
    ],
    ids=["cuts_lowest", "width_one", "width_exceeds_candidates", "result_sorted_by_id", "tie_prefers_lower_id", "none"],
)
def test_best_children_one_parent(scores, width, expected) -> None:
    tree, root, kids = _root_with_children(scores)
    assert tree.best_children([root], width) == [kids[i] for i in expected]


def test_best_children_ranks_by_cumulative_score_across_parents() -> None:
    tree, root, (a, b) = _root_with_children([-0.1, -3.0])
    (a1,) = tree.add_proposals(a, [(1, -1.0)])  # cumulative -1.1
    (b1,) = tree.add_proposals(b, [(1, -0.01)])  # cumulative -3.01, its own logprob is the best
    assert tree.best_children([a, b], 1) == [a1]
    assert tree.best_children([a, b], 2) == [a1, b1]


@pytest.mark.parametrize(
    "status", [Status.SENT, Status.ACCEPTED], ids=["skips_sent", "skips_accepted"]
)
def test_best_children_only_returns_drafted(status) -> None:
    tree, root, kids = _root_with_children([-0.1, -0.2, -0.3])
    tree[kids[0]].status = status
    assert tree.best_children([root], 3) == kids[1:]


def test_best_children_ignores_unknown_parents() -> None:
    tree, root, kids = _root_with_children([-0.1])
    assert tree.best_children([ROOT_PARENT, 99, root], 2) == kids
    assert tree.best_children([99], 2) == []


# --------------------------------------------------------------------------- subtree / remove / forget


def _sample_tree() -> tuple[TokenTree, dict[str, int]]:
    """root -> a -> (c -> e, d); root -> b."""
    tree = TokenTree()
    ids = {"root": tree.add_accepted(1, ROOT_PARENT, 0).node_id}
    ids["a"], ids["b"] = tree.add_proposals(ids["root"], [(2, -0.1), (3, -0.2)])
    ids["c"], ids["d"] = tree.add_proposals(ids["a"], [(4, -0.1), (5, -0.2)])
    (ids["e"],) = tree.add_proposals(ids["c"], [(6, -0.1)])
    return tree, ids


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ("root", {"root", "a", "b", "c", "d", "e"}),
        ("a", {"a", "c", "d", "e"}),
        ("c", {"c", "e"}),
        ("b", {"b"}),
    ],
    ids=["whole_tree", "inner", "chain", "leaf"],
)
def test_subtree_and_remove(top, expected) -> None:
    tree, ids = _sample_tree()
    sub = tree.subtree(ids[top])
    assert sub[0] == ids[top]
    assert sorted(sub) == sorted(ids[n] for n in expected)
    parent = tree[ids[top]].parent
    tree.remove(sub)
    assert set(tree.nodes) == {ids[n] for n in ids.keys() - expected}
    if parent in tree:
        assert ids[top] not in tree[parent].children
    for node in tree.nodes.values():
        assert all(c in tree for c in node.children)


def test_remove_ignores_missing_ids() -> None:
    tree, ids = _sample_tree()
    tree.remove([ids["b"], 999, ids["b"]])
    assert ids["b"] not in tree and tree[ids["root"]].children == [ids["a"]]


def test_speculative_is_every_non_accepted_node() -> None:
    tree, ids = _sample_tree()
    tree[ids["a"]].status = Status.ACCEPTED
    tree[ids["c"]].status = Status.SENT
    assert sorted(tree.speculative()) == sorted(ids[n] for n in ("b", "c", "d", "e"))


def test_sent_child_with_token_matches_only_sent_children() -> None:
    tree, ids = _sample_tree()
    assert tree.sent_child_with_token(ids["root"], 2) is None  # a is drafted, not sent
    tree[ids["a"]].status = Status.SENT
    assert tree.sent_child_with_token(ids["root"], 2) == ids["a"]
    assert tree.sent_child_with_token(ids["root"], 3) is None
    assert tree.sent_child_with_token(ids["root"], 4) is None  # c's token, but c is a grandchild


def test_forget_accepted_before_reroots_at_the_new_frontier() -> None:
    tree, ids = _sample_tree()
    tree.remove(tree.subtree(ids["b"]))
    tree[ids["a"]].status = Status.ACCEPTED
    tree.forget_accepted_before(ids["a"])
    assert ids["root"] not in tree
    assert tree[ids["a"]].parent == ROOT_PARENT
    assert sorted(tree.nodes) == sorted(ids[n] for n in ("a", "c", "d", "e"))
    assert tree.best_children([ids["a"]], 2) == [ids["c"], ids["d"]]


def test_node_ids_are_never_reused() -> None:
    tree, ids = _sample_tree()
    tree.remove(tree.subtree(ids["a"]))
    (fresh,) = tree.add_proposals(ids["b"], [(9, -0.1)])
    assert fresh > max(ids.values())


# --------------------------------------------------------------------------- property test: random operation sequences

TOKENS = st.integers(0, 7)  # a small vocabulary, so duplicates are common
LOGPROBS = st.floats(-8.0, 0.0, allow_nan=False, width=32)


class TokenTreeMachine(RuleBasedStateMachine):
    """Random operation sequences against TokenTree, with the scheduler's usage rules.

    Usage rules mirrored from the scheduler: an accepted node's parent is accepted
    (or ROOT_PARENT); a node is accepted only as a child of an accepted node;
    forget_accepted_before is called on the newest accepted node; remove gets whole subtrees.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tree = TokenTree()
        self.max_id = -1
        self.forgotten: set[int] = set()  # accepted nodes deleted by forget_accepted_before
        self.gone: set[int] = set()  # every id that left the tree

    # ---- helpers
    def _ids(self, status: Status | None = None) -> list[int]:
        return sorted(n for n, node in self.tree.nodes.items() if status is None or node.status is status)

    def _fresh(self, node_id: int) -> None:
        assert node_id > self.max_id, "node ids must grow monotonically and never be reused"
        self.max_id = node_id

    def _descendants(self, node_id: int) -> set[int]:
        out = set()
        for n in self.tree.nodes:
            m = n
            while m in self.tree.nodes:
                if m == node_id:
                    out.add(n)
                    break
                m = self.tree[m].parent
        return out

    # ---- rules
    @rule(token=TOKENS, position=st.integers(0, 40))
    def add_root(self, token: int, position: int) -> None:
        node = self.tree.add_accepted(token, ROOT_PARENT, position)
        self._fresh(node.node_id)
        assert node.status is Status.ACCEPTED and node.parent == ROOT_PARENT and node.score == 0.0

    @precondition(lambda self: any(n.status is Status.ACCEPTED for n in self.tree.nodes.values()))
    @rule(data=st.data(), token=TOKENS)
    def add_bonus(self, data: st.DataObject, token: int) -> None:
        parent = data.draw(st.sampled_from(self._ids(Status.ACCEPTED)), label="parent")
        before = list(self.tree[parent].children)
        node = self.tree.add_accepted(token, parent, self.tree[parent].position + 1)
        self._fresh(node.node_id)
        assert self.tree[parent].children == before + [node.node_id]

    @precondition(lambda self: self.tree.nodes)
    @rule(data=st.data(), proposals=st.lists(st.tuples(TOKENS, LOGPROBS), max_size=6))
    def propose(self, data: st.DataObject, proposals: list[tuple[int, float]]) -> None:
        parent = data.draw(st.sampled_from(self._ids()), label="parent")
        pnode = self.tree[parent]
        before = list(pnode.children)
        seen = {self.tree[c].token for c in before}
        expected = []
        for token, logprob in proposals:
            if token not in seen:
                seen.add(token)
                expected.append((token, logprob))
        added = self.tree.add_proposals(parent, proposals)
        assert pnode.expanded
        assert [(self.tree[n].token) for n in added] == [t for t, _ in expected]
        assert pnode.children == before + added
        for n, (_, logprob) in zip(added, expected):
            self._fresh(n)
            node = self.tree[n]
            assert node.status is Status.DRAFTED and node.parent == parent and not node.expanded
            assert node.position == pnode.position + 1
            assert node.score == pnode.score + logprob

    @precondition(lambda self: self.tree.nodes)
    @rule(data=st.data(), width=st.integers(1, 6), mark_sent=st.booleans())
    def best(self, data: st.DataObject, width: int, mark_sent: bool) -> None:
        pool = self._ids() + [ROOT_PARENT, self.max_id + 1000]
        parents = data.draw(st.lists(st.sampled_from(pool), unique=True, max_size=4), label="parents")
        candidates = {
            c for p in parents if p in self.tree for c in self.tree[p].children
            if self.tree[c].status is Status.DRAFTED
        }
        got = self.tree.best_children(parents, width)
        assert got == sorted(got) and len(set(got)) == len(got)
        assert set(got) <= candidates
        assert len(got) == min(width, len(candidates))
        rest = candidates - set(got)
        for g in got:
            for o in rest:  # top-width by score; ties go to the lower id
                assert (self.tree[g].score, -g) > (self.tree[o].score, -o)
        if mark_sent:  # the scheduler sends the level it picked
            for g in got:
                self.tree[g].status = Status.SENT

    @precondition(lambda self: self.tree.nodes)
    @rule(data=st.data())
    def prune_subtree(self, data: st.DataObject) -> None:
        top = data.draw(st.sampled_from(self._ids()), label="top")
        sub = self.tree.subtree(top)
        assert len(sub) == len(set(sub)), "subtree lists a node twice"
        assert set(sub) == self._descendants(top), "subtree must be exactly the node and its descendants"
        parent = self.tree[top].parent
        self.tree.remove(sub)
        self.gone.update(sub)
        assert not set(sub) & set(self.tree.nodes)
        if parent in self.tree:
            assert top not in self.tree[parent].children

    @precondition(
        lambda self: any(
            n.status is not Status.ACCEPTED and n.parent in self.tree.nodes
            and self.tree[n.parent].status is Status.ACCEPTED
            for n in self.tree.nodes.values()
        )
    )
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        """What Scheduler._accept does: prune the siblings, accept the child, re-root there."""
        options = [
            n for n in self._ids() if self.tree[n].status is not Status.ACCEPTED
            and self.tree[n].parent in self.tree and self.tree[self.tree[n].parent].status is Status.ACCEPTED
        ]
        child = data.draw(st.sampled_from(options), label="child")
        frontier = self.tree[child].parent
        siblings = [n for c in self.tree[frontier].children if c != child for n in self.tree.subtree(c)]
        self.tree.remove(siblings)
        self.gone.update(siblings)
        assert self.tree[frontier].children == [child]
        self.tree[child].status = Status.ACCEPTED
        self._forget(child)

    @precondition(lambda self: any(n.status is Status.ACCEPTED for n in self.tree.nodes.values()))
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        """forget_accepted_before on an accepted node with no accepted children (the frontier)."""
        options = [
            n for n in self._ids(Status.ACCEPTED)
            if not any(self.tree[c].status is Status.ACCEPTED for c in self.tree[n].children)
        ]
        self._forget(data.draw(st.sampled_from(options), label="frontier"))

    def _forget(self, node_id: int) -> None:
        dropped = {n for n in self._ids(Status.ACCEPTED) if n != node_id}
        self.tree.forget_accepted_before(node_id)
        self.forgotten |= dropped
        self.gone |= dropped
        assert self.tree[node_id].parent == ROOT_PARENT
        assert self._ids(Status.ACCEPTED) == [node_id]

    # ---- invariants
    @invariant()
    def structure(self) -> None:
        nodes = self.tree.nodes
        assert not set(nodes) & self.gone, "a removed node came back"
        for nid, node in nodes.items():
            assert node.node_id == nid
            p = node.parent
            assert p == ROOT_PARENT or p in nodes or p in self.forgotten, f"node {nid} has a dangling parent {p}"
            if p in nodes:
                assert nid in nodes[p].children, f"node {nid} missing from its parent's children"
                assert node.position == nodes[p].position + 1
            assert len(node.children) == len(set(node.children))
            for c in node.children:
                assert c in nodes, f"node {nid} lists a dangling child {c}"
                assert nodes[c].parent == nid
            drafted = [nodes[c].token for c in node.children if nodes[c].status is not Status.ACCEPTED]
            assert len(drafted) == len(set(drafted)), "add_proposals must never create two children with one token"

    @invariant()
    def speculative_is_the_non_accepted_nodes(self) -> None:
        assert sorted(self.tree.speculative()) == sorted(
            n for n, node in self.tree.nodes.items() if node.status is not Status.ACCEPTED
        )

    @invariant()
    def sent_child_lookup(self) -> None:
        for nid, node in self.tree.nodes.items():
            for token in {self.tree[c].token for c in node.children}:
                found = self.tree.sent_child_with_token(nid, token)
                sent = [c for c in node.children if self.tree[c].token == token and self.tree[c].status is Status.SENT]
                assert found == (sent[0] if sent else None)


TokenTreeMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTokenTreeMachine = TokenTreeMachine.TestCase
