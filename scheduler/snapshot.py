"""The scheduler's state as one SchedulerStatsMsg (pure: the service writes it to Redis)."""

from __future__ import annotations

from scheduler.mode_check import Mode
from scheduler.occupancy import Occupancy
from scheduler.scheduler import Phase, Scheduler
from shared.wire.messages import SchedulerStatsMsg

MAX_LISTED = 100  # requests listed by name; the counts are always complete


def stats_message(scheduler: Scheduler, waiting_since: dict[str, float], occupancy: Occupancy,
                  now: float, wall_time: float) -> SchedulerStatsMsg:
    """waiting_since: queued request id -> monotonic arrival, oldest first; now: monotonic clock."""
    totals = scheduler.totals()
    running = [s for s in scheduler.requests.values() if s.phase is not Phase.DONE]
    return SchedulerStatsMsg(
        time=wall_time,
        stages=occupancy.stages,
        steps=scheduler.step,
        num_waiting=len(waiting_since),
        waiting=[[rid, round(now - t, 3)] for rid, t in list(waiting_since.items())[:MAX_LISTED // 2]],
        num_running=len(running),
        running=[[s.request.request_id, len(s.output), s.request.max_new_tokens, scheduler.policy_of(s.request).name]
                 for s in running[:MAX_LISTED]],
        tokens=totals.accepted + totals.bonus,
        drafts=totals.drafts,
        draft_tokens=totals.sent_speculative,
        accepted=totals.accepted,
        accepted_per_depth=list(totals.accepted_per_depth),
        pruned=totals.pruned,
        stage_busy=[round(f, 4) for f in occupancy.totals.busy_fraction()],
        useful_rows=occupancy.totals.useful,
        wasted_rows=occupancy.totals.wasted,
        speculating=scheduler.mode is Mode.SPEC,
        mode_rates={k: round(v, 3) for k, v in scheduler.mode_check.snapshot().items()},
    )
