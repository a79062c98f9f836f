"""The scheduler's channel to the draft workers (scheduler/drafts.py), without Redis: what arrives is applied."""

from __future__ import annotations

import pytest

from scheduler.drafts import DraftChannel
from scheduler.scheduler import Request, Scheduler
from scheduler.width import WidthPlan
from shared.transport.redis_io import RedisConfig
from shared.types.config import EngineConfig, PolicyConfig
from shared.types.errors import ConfigError
from shared.wire.messages import ExpansionJobMsg, ProposalsMsg, decode

pytestmark = pytest.mark.unit

# label: the pipe waits for the draft (the forward's own time is the draft's pace in every mode; what a waited
# level costs, its queue behind the draft's other work included, is learnt apart, from the steps it paced)
PACES = {
    "never waits": False,
    "waits": True,
    "the plan chooses": None,
}


@pytest.mark.parametrize("case", list(PACES))
def test_a_forward_reported_with_its_proposals_sets_the_draft_pace(case) -> None:
    waits = PACES[case]
    scheduler = Scheduler(PolicyConfig("specpipe", 4, 2, draft_waits=waits), EngineConfig(), context_limit=4096)
    wait_s = 0.0 if waits is False else 0.5
    channel = DraftChannel(None, RedisConfig(), scheduler, wait_s, receive=lambda timeout_ms: None)
    channel.take(ProposalsMsg("gone", 3, [7], [-0.1], forward_nodes=4, forward_s=0.3))  # its request has ended
    channel.take(ProposalsMsg("gone", 4, [8], [-0.2]))  # the same forward's other answers carry nothing
    channel.draft(epoch=0)
    assert scheduler.draft_costs(4) == pytest.approx(0.3)
    assert not scheduler.wait_costs.points and scheduler.draft_known()


class Streams:
    """Records what would be XADDed (a Redis client's pipeline, as publish_all uses it)."""

    def __init__(self) -> None:
        self.added: list[tuple[str, object]] = []

    def pipeline(self, transaction: bool = False) -> Streams:
        return self

    def xadd(self, stream: str, fields: dict, maxlen=None, approximate=True) -> None:
        self.added.append((stream, decode(fields["m"])))

    def execute(self) -> list:
        return []


@pytest.mark.parametrize("policy", ["specpipe", "pp"])
def test_an_admitted_request_sends_its_prompt_to_the_drafts_with_the_next_jobs(policy) -> None:
    """Off the beat (the shadow's round trip), a job with no nodes: the drafts compute the prompt while the stages
    prefill it. Nothing awaits it; a pp request is never drafted for."""
    scheduler = Scheduler(PolicyConfig(policy, 4, 2), EngineConfig(), context_limit=4096)
    request = Request("r", (5, 17, 99, 3), max_new_tokens=8)
    scheduler.add_request(request)
    redis = Streams()
    channel = DraftChannel(redis, RedisConfig(), scheduler, wait_s=1.0, receive=lambda timeout_ms: None)
    channel.admitted(epoch=3, request=request)
    channel.ask(epoch=3, pipe=redis)
    jobs = [m for _, m in redis.added if isinstance(m, ExpansionJobMsg)]
    if policy == "pp":
        assert jobs == []
        return
    [job] = jobs
    assert (job.request_id, job.nodes, job.text, job.epoch) == ("r", [], [5, 17, 99, 3], 3)
    assert not channel.awaiting
    channel.ask(epoch=3, pipe=redis)
    assert len([m for _, m in redis.added if isinstance(m, ExpansionJobMsg)]) == 1  # sent once


# label: (the policy's draft waits, the service's draft wait in s)
DISAGREE = {"a policy that waits, a wait of 0": (True, 0.0), "a draft beside the pipe, a wait of 1 s": (False, 1.0),
            "a plan that may wait, a wait of 0": (None, 0.0)}


@pytest.mark.parametrize("case", list(DISAGREE))
def test_the_draft_wait_and_the_policy_must_agree(case) -> None:
    """Two settings of one fact (does the pipe wait for the draft?): the plan prices steps by the policy's, the
    channel waits by its own, so a channel that disagrees is refused."""
    waits, wait_s = DISAGREE[case]
    scheduler = Scheduler(PolicyConfig("specpipe", 4, 2, draft_waits=waits), EngineConfig(), context_limit=4096)
    with pytest.raises(ConfigError, match="draft wait"):
        DraftChannel(None, RedisConfig(), scheduler, wait_s=wait_s, receive=lambda timeout_ms: None)


# label: (the plan in force waits for the draft, whether the channel waits for a job not yet answered)
PLANNED = {"a plan that waits: the channel waits, up to its bound": (True, True),
           "a plan that runs the draft beside the pipe: it never waits": (False, False)}


@pytest.mark.parametrize("case", list(PLANNED))
def test_where_the_plan_chooses_the_channel_waits_only_under_a_waiting_plan(case) -> None:
    plan_waits, waits = PLANNED[case]
    scheduler = Scheduler(PolicyConfig("specpipe", 4, 2, draft_waits=None), EngineConfig(), context_limit=4096)
    scheduler._plan = WidthPlan({}, 0, 0, waits=plan_waits)
    polls: list[int | None] = []
    channel = DraftChannel(Streams(), RedisConfig(), scheduler, wait_s=0.05, receive=polls.append)
    channel.awaiting.add(("r", 3))  # a job published during the last step, not answered yet
    start, end = channel.draft(epoch=0)
    assert any(t for t in polls) == waits  # polled with a timeout, or only without one
    assert (end - start >= 0.05) == waits
