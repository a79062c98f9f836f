"""The stage process's per-step books (stage_worker/service.py), over a real Redis with its own prefix: a one-stage
pipeline of the null runner, fed StepMsgs directly."""

from __future__ import annotations

import uuid

import pytest
import torch

from shared.transport.membership import PipelineRun
from shared.transport.redis_io import RedisConfig
from shared.types.batch import PipelineEvent, Row
from shared.types.config import ModelArch
from shared.wire.messages import AdmittedRequest, StepMsg
from specpipe.cluster import delete_keys
from stage_worker.null_runner import NullRunner
from stage_worker.service import StageService, StageServiceConfig

pytestmark = pytest.mark.unit


class Recording(NullRunner):
    """The null runner, noting the requests of every forward's rows."""

    def __init__(self, arch: ModelArch):
        super().__init__(arch, rank=0, world=1, compute_ms=0.0, dtype=torch.float32)
        self.computed: list[list[str]] = []

    def forward(self, batch):
        self.computed.append([r.request_id for r in batch.rows])
        return super().forward(batch)


@pytest.fixture
def stage(tiny_dir):
    cfg = StageServiceConfig(rank=0, world=1, redis=RedisConfig(prefix=f"test-stage-{uuid.uuid4().hex[:8]}"))
    service = StageService(cfg, Recording(ModelArch.from_model_dir(tiny_dir)))
    service.run_ = PipelineRun(epoch=1, base_step=0)
    yield service
    service.inbox.close()
    delete_keys(service.r, cfg.redis.prefix)


def _step(n: int, admitted: list[str] = (), finished: list[str] = (), rows: list[str] = ()) -> StepMsg:
    """Step n: requests admitted (slot = their index), ended, and one committed row for each of `rows`."""
    rows_ = [Row(rid, n, -1, n, 7, True, True) for rid in rows]
    return StepMsg(step=n, batch_id=n, epoch=1, events=[PipelineEvent(rid, "finish") for rid in finished],
                   admitted=[AdmittedRequest(rid, int(rid[1:]), 4, 64) for rid in admitted],
                   **StepMsg.columns(rows_))


def test_a_stage_forgets_every_request_the_scheduler_ended(stage) -> None:
    """A long-running stage serves request after request: each one's slot, id and finished mark go when the step
    that finishes it is done, so what it keeps is bounded by the requests in flight, not by all it ever served."""
    for n in range(1, 201):
        rid, prev = f"r{n}", f"r{n - 1}"
        stage.step(_step(n, admitted=[rid], finished=[prev] if n > 1 else [], rows=[rid]))
    assert stage.slots == {"r200": 200} and stage.ids == {200: "r200"}
    assert stage.finished == set() and stage.runner.requests == {"r200"}


def test_a_finished_request_rows_are_dropped_in_the_step_that_ends_it(stage) -> None:
    """Rows still addressed to a request in the step that finishes it are not computed; the next request to get
    its slot is not mistaken for it."""
    stage.step(_step(1, admitted=["r1", "r2"], rows=["r1", "r2"]))
    stage.step(_step(2, finished=["r1"], rows=["r1", "r2"]))
    assert stage.runner.computed == [["r1", "r2"], ["r2"]]
    assert stage.slots == {"r2": 2} and "r1" not in stage.finished
    stage.step(_step(3, admitted=["r1"], rows=["r1"]))  # the same id again: a new request, served again
    assert stage.runner.computed[-1] == ["r1"]
    assert stage.slots == {"r2": 2, "r1": 1} and stage.runner.requests == {"r1", "r2"}
