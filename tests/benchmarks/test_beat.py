"""benchmarks.beat's smoke run: a real cluster of null stages, the beat measured and summarized."""

from __future__ import annotations

import pytest

from benchmarks import beat

pytestmark = pytest.mark.multiproc


def test_beat_smoke(capsys) -> None:
    assert beat.main(["--stages", "4", "--policies", "specpipe", "--requests", "16", "--tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("4 stages specpipe  16 requests:")
    assert int(lines[0].split(": ")[1].split(" steps")[0]) > 0
    last = lines[-1].split()
    assert last[:3] == ["beat", "overhead", "p50"] and float(last[3]) >= 0 and float(last[6]) >= float(last[3])
