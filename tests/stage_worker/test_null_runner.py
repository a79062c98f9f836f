"""The null stage of benchmarks.beat: no model, the StageRunner interface, targets that keep the n-gram draft
always right."""

from __future__ import annotations

import pytest
import torch

from shared.types.batch import MicroBatch, PipelineEvent, Row, StageOutput
from shared.types.config import ModelArch
from stage_worker.null_runner import NullRunner

pytestmark = pytest.mark.unit


def _rows() -> list[Row]:
    return [Row("a", 1, -1, 8, 42, True, True), Row("a", 2, 1, 9, 7, False, False)]


# label: (rank, world, what forward returns)
STAGES = {"a middle stage passes zeros on": (1, 3, MicroBatch), "the last stage answers targets": (2, 3, StageOutput)}


@pytest.mark.parametrize("case", list(STAGES))
def test_null_stage_forward(tiny_dir, case) -> None:
    rank, world, kind = STAGES[case]
    arch = ModelArch.from_model_dir(tiny_dir)
    runner = NullRunner(arch, rank, world, compute_ms=0.0, dtype=torch.float32)
    runner.add_request("a", None, 64)
    out = runner.forward(MicroBatch(3, _rows(), torch.ones(2, arch.hidden_size)))
    assert isinstance(out, kind) and out.batch_id == 3 and out.rows == _rows()
    if kind is StageOutput:
        assert out.targets == [42, -1]  # a row's own token, where it asked for one
    else:
        assert out.hidden.shape == (2, arch.hidden_size) and not out.hidden.any()
    runner.apply([PipelineEvent("a", "finish")])
    assert not runner.requests
