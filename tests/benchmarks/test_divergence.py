"""The divergence count: where a candidate's tokens first differ from plain decoding's, and the rate's
denominator (tokens compared up to each divergence)."""

from __future__ import annotations

import pytest

from benchmarks.divergence import compare

pytestmark = pytest.mark.unit

# label: (reference outputs, candidate outputs) -> (diverged, first divergences, tokens compared)
CASES = {
    "identical": ([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], (0, [], 5)),
    "differs at the third token": ([[1, 2, 3, 4]], [[1, 2, 9, 9]], (1, [2], 3)),
    "stops early (eos flipped)": ([[1, 2, 3]], [[1, 2]], (1, [2], 3)),
    "one of two differs at once": ([[1, 2], [3, 4]], [[1, 2], [5, 4]], (1, [0], 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compare(case) -> None:
    reference, candidate, (diverged, firsts, compared) = CASES[case]
    result = compare(reference, candidate)
    assert (result["diverged"], result["first_divergence"], result["tokens_compared"]) == (diverged, firsts, compared)
    assert result["per_1k_tokens"] == pytest.approx(1000 * diverged / compared)
