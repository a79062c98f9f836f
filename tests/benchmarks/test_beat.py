"""benchmarks.beat's smoke run: real clusters of null stages, lockstep and async, at normal and realtime priority,
the beat measured and summarized."""

from __future__ import annotations

import pytest

from benchmarks import beat

pytestmark = pytest.mark.multiproc


def test_beat_smoke(capsys) -> None:
    assert beat.main(["--stages", "4", "--policies", "specpipe", "--requests", "16", "--tokens", "6",
                      "--realtime-priority", "0,10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = ["lockstep ", "lockstep rt 10 ", "async    ", "async    rt 10 "]
    for line, run in zip(lines, runs, strict=False):
        assert line.startswith(f"4 stages specpipe {run} 16 requests:"), line
        assert int(line.split(": ")[1].split(" steps")[0]) > 0
    assert all("by the scheduler's loop" in line for line in lines[:2])
    assert not any("by the scheduler's loop" in line for line in lines[2:4])
    assert lines[-2] == "# the line below: async scheduling, realtime priority 10"
    last = lines[-1].split()
    assert last[:3] == ["beat", "overhead", "p50"] and float(last[3]) >= 0 and float(last[6]) >= float(last[3])
