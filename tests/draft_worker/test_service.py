"""The draft worker process's job handling (draft_worker/service.py), over a real Redis with its own prefix."""

from __future__ import annotations

import uuid

import pytest

from draft_worker.service import DraftService, DraftServiceConfig
from shared.transport.redis_io import RedisConfig
from shared.types.batch import PipelineEvent
from shared.types.speculation import NodeRef
from shared.wire.messages import DraftEventsMsg, ExpansionJobMsg
from specpipe.cluster import delete_keys

pytestmark = pytest.mark.unit
PROMPT = [5, 17, 99, 3, 5, 17, 42, 7]


class Recorder:
    """A source that records what it was asked to compute."""

    name, computed_rows = "recorder", 0

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.prefilled: list[tuple[str, list[int]]] = []
        self.expanded: list[int] = []

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None:
        self.registered.append(request_id)

    def prefill(self, request_id: str, prompt: list[int]) -> int:
        self.prefilled.append((request_id, prompt))
        return len(prompt)

    def expand(self, jobs):
        self.expanded += [ref.node_id for job in jobs for ref in job.nodes]
        return [(job.request_id, ref.node_id, []) for job in jobs for ref in job.nodes]

    def apply(self, events) -> None:
        pass


@pytest.fixture
def service():
    cfg = DraftServiceConfig(RedisConfig(prefix=f"test-draftsvc-{uuid.uuid4().hex[:8]}"), name="draft-test")
    source = Recorder()
    svc = DraftService(cfg, source)
    yield svc, source
    delete_keys(svc.r, cfg.redis.prefix)


def _job(rid: str, nodes: list[NodeRef]) -> bytes:
    return ExpansionJobMsg(request_id=rid, as_of_step=0, text=PROMPT, nodes=nodes, top_k=2, capacity=64).encode()


def test_a_job_with_no_nodes_drafts_the_prompt_once_before_the_first_expansion(service) -> None:
    svc, source = service
    svc._handle([_job("r", [])])  # admitted: the prompt, now
    svc._handle([_job("r", []), _job("r", [NodeRef(0, -1, 7, len(PROMPT), True)])])  # again, then the first node
    assert source.registered == ["r"]
    assert source.prefilled == [("r", PROMPT)]  # once: a second admission job finds it known
    assert source.expanded == [0]


def test_a_job_after_its_request_finished_does_not_register_it_again(service) -> None:
    """A prompt sent at admission can reach the worker after the request's finish (cancelled at once): the worker
    must not hold KV for it with no finish to come."""
    svc, source = service
    svc._apply(DraftEventsMsg(step=1, events=[PipelineEvent("gone", "finish")], epoch=0))
    svc._handle([_job("gone", []), _job("gone", [NodeRef(0, -1, 7, len(PROMPT), True)])])
    assert source.registered == [] and source.prefilled == [] and source.expanded == []
    assert "gone" not in svc.known


def test_a_reads_levels_are_drafted_and_answered_before_its_prompts(service) -> None:
    """A request admitted while another's level is waited for: the level does not queue behind the prompt."""
    svc, source = service
    svc._handle([_job("old", [])])
    order: list[str] = []
    source.prefill = lambda rid, prompt: order.append(f"prompt {rid}") or len(prompt)
    source.expand = lambda jobs: order.append("level") or []
    reply = svc._reply
    svc._reply = lambda proposals, forward=(0, 0.0): order.append("answered") or reply(proposals, forward)
    svc._handle([_job("new", []), _job("old", [NodeRef(0, -1, 7, len(PROMPT), True)])])
    assert order == ["level", "answered", "prompt new"]
