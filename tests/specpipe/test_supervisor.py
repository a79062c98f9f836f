"""The supervisor of `specpipe up` on real child processes: what it restarts, when it gives up, and which
deaths stop the cluster."""

from __future__ import annotations

import sys
import time

import pytest

from specpipe.supervisor import Child, RestartPolicy, Supervisor

pytestmark = pytest.mark.unit

FAST = dict(backoff_s=0.05, max_backoff_s=0.05, window_s=60)


def _child(name: str, code: int, essential: bool = True) -> Child:
    return Child(name, [sys.executable, "-c", f"import sys; sys.exit({code})"], essential)


def _run(sup: Supervisor, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reason = sup.poll()
        if reason is not None:
            return reason
        time.sleep(0.02)
    return None


# label: (policy, exit code, essential, max restarts) -> (starts seen, the cluster stops)
CASES = {
    "on-failure restarts a crash until the limit, then stops": ("on-failure", 3, True, 2, 3, True),
    "on-failure leaves a clean exit down": ("on-failure", 0, True, 5, 1, True),
    "always restarts a clean exit too": ("always", 0, True, 2, 3, True),
    "no: a lost draft worker only lowers speculation": ("no", 3, False, 5, 1, False),
    "a draft worker past its restarts stays down, the cluster serves": ("on-failure", 3, False, 1, 2, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_restart_policy(case) -> None:
    mode, code, essential, max_restarts, starts, stops = CASES[case]
    exits: list[str] = []
    sup = Supervisor([_child("child", code, essential)], RestartPolicy(mode, max_restarts=max_restarts, **FAST),
                     on_exit=exits.append)
    sup.start()
    reason = _run(sup, 5.0 if stops else 2.0)
    assert (reason is not None) == stops, reason
    assert len(exits) == starts  # each start ended, and each exit was reported (its heartbeat deleted)
    if stops:
        assert "child exited" in reason and f"--restart {mode}" in reason


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
