"""--realtime-priority: the beat's processes take SCHED_FIFO where the host allows it, and say so where it does not
(they still serve, at normal priority). Only the scheduler, the stages and the draft workers are on the beat."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys

import pytest

from shared import service_args
from specpipe.cluster import ClusterConfig, commands

pytestmark = pytest.mark.unit

CAP_SYS_NICE = 23  # linux/capability.h
# a fresh process (the test's own scheduling stays as it is): take the priority, print what the kernel says
PROBE = ("import os, sys; from shared.service_args import set_realtime; set_realtime(int(sys.argv[1])); "
         "print(os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)")


def _may_take_fifo(priority: int) -> bool:
    """What the kernel checks: CAP_SYS_NICE in this process's effective set, or an rtprio limit of at least the
    priority."""
    with open("/proc/self/status") as f:
        cap_eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    return bool(cap_eff >> CAP_SYS_NICE & 1) or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= priority


# label: (priority asked, expected policy where the host allows FIFO, expected priority there)
CASES = {
    "off": (0, os.SCHED_OTHER, 0),
    "priority 7": (7, os.SCHED_FIFO, 7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_process_takes_the_priority_asked_where_allowed(case) -> None:
    asked, policy, priority = CASES[case]
    out = subprocess.run([sys.executable, "-c", PROBE, str(asked)], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), check=True)
    got = tuple(int(x) for x in out.stdout.split())
    if asked and not _may_take_fifo(asked):  # refused: normal priority, and a warning that says why
        assert got == (os.SCHED_OTHER, 0) and "SCHED_FIFO not allowed" in out.stderr, (got, out.stderr)
    else:
        assert got == (policy, priority) and "not allowed" not in out.stderr, (got, out.stderr)


def test_a_refused_priority_is_a_warning_not_an_exit(monkeypatch, caplog) -> None:
    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(service_args.os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING):
        service_args.set_realtime(5)
    assert "--realtime-priority 5: SCHED_FIFO not allowed" in caplog.text


# label: (ClusterConfig, processes given --realtime-priority)
CLUSTERS = {
    "off": (ClusterConfig(stages=2), set()),
    "specpipe, n-gram in the scheduler": (ClusterConfig(stages=2, realtime_priority=10, device="cpu"),
                                          {"scheduler", "stage-0", "stage-1"}),
    "specpipe, a draft worker": (ClusterConfig(stages=2, realtime_priority=10, ngram_in="workers"),
                                 {"scheduler", "stage-0", "stage-1", "draft-0"}),
    "pp, no draft": (ClusterConfig(stages=3, policy="pp", realtime_priority=10),
                     {"scheduler", "stage-0", "stage-1", "stage-2"}),
}


@pytest.mark.parametrize("case", list(CLUSTERS))
def test_up_gives_the_priority_to_the_beats_processes_only(case) -> None:
    cfg, on_beat = CLUSTERS[case]
    procs = commands(cfg)
    given = {name for name, cmd in procs.items() if "--realtime-priority" in cmd}
    assert given == on_beat
    for name in given:
        cmd = procs[name]
        assert cmd[cmd.index("--realtime-priority") + 1] == str(cfg.realtime_priority)
