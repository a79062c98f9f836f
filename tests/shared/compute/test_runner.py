"""A request a stage cannot compute fails alone: its rows leave the output, the others' outputs are what they
are without it."""

from __future__ import annotations

import pytest
import torch

from shared.compute.runner import RequestInfo, StageRunner, load_stage
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams
from shared.types.errors import ProtocolError, RequestError
from shared.types.structured import grammar_of

pytestmark = pytest.mark.unit
GOOD, BAD = [11, 42, 7, 300, 5, 9], [3, 8, 13, 21]


class FailingGrammar:
    """A matcher that fails when asked for a mask (llguidance's limits, an internal error)."""

    def allowed(self, output: list[int]):
        raise RequestError("grammar failed: out of fuel")


def _prompt_rows(rid: str, prompt: list[int]) -> list[Row]:
    """A whole prompt as one chunk, the target after its last token wanted."""
    last = len(prompt) - 1
    return [Row(rid, -(p + 2), -(p + 1), p, t, True, p == last) for p, t in enumerate(prompt)]


def _runner(tiny_dir, stages: int = 1) -> StageRunner:
    return load_stage(tiny_dir, ModelArch.from_model_dir(tiny_dir), 0, stages)


def _add(runner: StageRunner, rid: str, prompt: list[int], capacity: int = 64,
         sampling: SamplingParams | None = None) -> None:
    runner.add_request(rid, RequestInfo(len(prompt), sampling or SamplingParams()), capacity)


def _kv_full(runner: StageRunner) -> None:
    _add(runner, "bad", BAD, capacity=2)


def _unknown(runner: StageRunner) -> None:
    pass  # never registered here (a stage that refused it)


def _grammar_fails(runner: StageRunner) -> None:
    _add(runner, "bad", BAD, sampling=SamplingParams(grammar=grammar_of({"type": "json_object"})))
    runner.matchers["bad"] = FailingGrammar()


def _out_of_order(runner: StageRunner) -> None:
    _add(runner, "bad", BAD)
    runner.kv["bad"].prefix_len = 1  # its first row's position no longer follows the cache


# label: (how the bad request is set up, a word of the error it ends with, stages: 1 = the last stage computes
# targets, 2 = a first stage passes hidden states on)
FAILURES = {
    "kv full": (_kv_full, "KV cache full", 1),
    "kv full, first of two stages": (_kv_full, "KV cache full", 2),
    "unknown here": (_unknown, "unknown to this stage", 1),
    "grammar fails": (_grammar_fails, "out of fuel", 1),
    "rows out of order": (_out_of_order, "committed row", 1),
}


@pytest.mark.parametrize("setup,error,stages", list(FAILURES.values()), ids=list(FAILURES))
def test_a_request_that_cannot_be_computed_fails_alone(tiny_dir, setup, error, stages) -> None:
    alone = _runner(tiny_dir, stages)
    _add(alone, "good", GOOD)
    expected = alone.forward(MicroBatch(1, _prompt_rows("good", GOOD)))

    mixed = _runner(tiny_dir, stages)
    _add(mixed, "good", GOOD)
    setup(mixed)
    rows = _prompt_rows("bad", BAD)[:2] + _prompt_rows("good", GOOD) + _prompt_rows("bad", BAD)[2:]
    out = mixed.forward(MicroBatch(1, rows))

    assert out.rows == expected.rows
    if stages == 1:
        assert out.targets == expected.targets and out.targets[-1] >= 0
    else:
        assert torch.equal(out.hidden, expected.hidden)
    failures = mixed.take_failures()
    assert list(failures) == ["bad"] and error in failures["bad"]
    assert "bad" not in mixed.kv and mixed.take_failures() == {}


def test_hidden_still_raises_for_a_row_it_cannot_place(tiny_dir) -> None:
    runner = _runner(tiny_dir)
    with pytest.raises(ProtocolError, match="unknown to this stage"):
        runner.hidden(MicroBatch(1, _prompt_rows("nobody", GOOD)))
