"""The scheduler's channel to the draft workers (scheduler/drafts.py), without Redis: what arrives is applied."""

from __future__ import annotations

import pytest

from scheduler.drafts import DraftChannel
from scheduler.scheduler import Scheduler
from shared.transport.redis_io import RedisConfig
from shared.types.config import EngineConfig, PolicyConfig
from shared.wire.messages import ProposalsMsg

pytestmark = pytest.mark.unit

# label: (the pipe waits for the draft, the draft's cost the width plan learns for 4 nodes)
PACES = {
    "never waits: the forward's own time is the draft's pace": (False, 0.3),
    "waits: the draft's cost is what the steps it paced took": (True, 0.0),
}


@pytest.mark.parametrize("case", list(PACES))
def test_a_forward_reported_with_its_proposals_sets_the_draft_pace(case) -> None:
    waits, learnt = PACES[case]
    scheduler = Scheduler(PolicyConfig("specpipe", 4, 2, draft_waits=waits), EngineConfig(), context_limit=4096)
    channel = DraftChannel(None, RedisConfig(), scheduler, wait_s=0.0, receive=lambda timeout_ms: None)
    channel.take(ProposalsMsg("gone", 3, [7], [-0.1], forward_nodes=4, forward_s=0.3))  # its request has ended
    channel.take(ProposalsMsg("gone", 4, [8], [-0.2]))  # the same forward's other answers carry nothing
    channel.draft(epoch=0)
    assert scheduler.draft_costs(4) == pytest.approx(learnt)
