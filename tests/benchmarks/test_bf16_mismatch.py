"""The bf16 mismatch measurement: its comparison helper, and a run on tiny-random."""

from __future__ import annotations

import pytest

from benchmarks.bf16_mismatch import first_difference, markdown, measure
from tests.conftest import PROMPTS_DIR

pytestmark = pytest.mark.unit

# label: (a, b, expected index of the first difference)
CASES = {
    "equal": ([1, 2, 3], [1, 2, 3], None),
    "differ at 1": ([1, 2, 3], [1, 5, 3], 1),
    "differ at 0": ([4], [5], 0),
    "one stops early": ([1, 2], [1, 2, 3], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_difference(case) -> None:
    a, b, expected = CASES[case]
    assert first_difference(a, b) == expected


def test_speculation_in_bf16_equals_plain_bf16_decoding() -> None:
    rows = measure("tiny-random", PROMPTS_DIR / "mt_bench.jsonl", limit=2, tokens=8, stages=4)
    assert [r["tokens"] for r in rows] == [8, 8]
    assert all(r["specpipe_bf16_equals_plain_bf16"] for r in rows)  # row invariance holds in bf16 too
    assert "of 2 prompts" in markdown(rows, "tiny-random", 4)
