"""NodePaths: the last stage's view of each node's prefix, through commits and prunes in any order."""

from __future__ import annotations

import pytest

from shared.compute.history import NodePaths
from shared.types.batch import ROOT_PARENT, Row

pytestmark = pytest.mark.unit


def _row(node: int, parent: int, position: int, token: int, committed: bool = False) -> Row:
    return Row("r", node, parent, position, token, committed, True)


def _prompt(paths: NodePaths, tokens: list[int]) -> None:
    for p, t in enumerate(tokens):
        paths.see(_row(-(p + 2), -(p + 1), p, t, committed=True))


def test_a_node_sees_the_committed_text_then_its_own_path() -> None:
    paths = NodePaths()
    _prompt(paths, [7, 8])
    root = _row(0, ROOT_PARENT, 2, 50, committed=True)
    a, b, c = _row(1, 0, 3, 60), _row(2, 0, 3, 61), _row(3, 1, 4, 70)  # siblings a, b; c below a
    for row in (root, a, b, c):
        paths.see(row)
    assert paths.history(root) == [7, 8, 50]
    assert paths.history(b) == [7, 8, 50, 61]
    assert paths.history(c) == [7, 8, 50, 60, 70]
    paths.prune((2,))
    paths.commit((1,))
    assert paths.text == [7, 8, 50, 60]
    assert paths.history(c) == [7, 8, 50, 60, 70]


def test_a_node_accepted_before_it_reaches_the_last_stage_joins_the_text_on_arrival() -> None:
    paths = NodePaths()
    _prompt(paths, [7])
    paths.see(_row(0, ROOT_PARENT, 1, 50, committed=True))
    paths.commit((1,))  # accepted while its row was still in the pipe
    paths.see(_row(1, 0, 2, 60))
    child = _row(2, 1, 3, 70)
    paths.see(child)
    assert paths.text == [7, 50, 60]
    assert paths.history(child) == [7, 50, 60, 70]
