"""benchmarks.beat's smoke run: real clusters of null stages, lockstep and async, the beat measured and summarized."""

from __future__ import annotations

import pytest

from benchmarks import beat

pytestmark = pytest.mark.multiproc


def test_beat_smoke(capsys) -> None:
    assert beat.main(["--stages", "4", "--policies", "specpipe", "--requests", "16", "--tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for line, loop in zip(lines, ["lockstep", "async   "]):
        assert line.startswith(f"4 stages specpipe {loop}  16 requests:"), line
        assert int(line.split(": ")[1].split(" steps")[0]) > 0
    assert "by the scheduler's loop" in lines[0] and "by the scheduler's loop" not in lines[1]
    last = lines[-1].split()
    assert last[:3] == ["beat", "overhead", "p50"] and float(last[3]) >= 0 and float(last[6]) >= float(last[3])
