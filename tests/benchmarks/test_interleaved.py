"""benchmarks.interleaved's arms: which cluster each names (the runs themselves: test_serving_smoke)."""

from __future__ import annotations

import pytest

from benchmarks import interleaved
from benchmarks.serving import ServingConfig

pytestmark = pytest.mark.unit

# label: (arm, (policy, async scheduling, refill depth: None is the services' default))
ARMS = {"plain pp": ("pp", ("pp", False, None)), "specpipe": ("specpipe", ("specpipe", False, None)),
        "specpipe, async": ("specpipe-async", ("specpipe", True, None)),
        "specpipe, refill 2": ("specpipe-r2", ("specpipe", False, 2)),
        "specpipe, async, refill 3": ("specpipe-async-r3", ("specpipe", True, 3))}


@pytest.mark.parametrize("case", list(ARMS))
def test_an_arm_names_its_cluster(case) -> None:
    arm, expected = ARMS[case]
    spec = interleaved.arm_spec(ServingConfig(), arm)
    assert (spec.policy, spec.async_scheduling, spec.refill_depth) == expected


@pytest.mark.parametrize("arms", ["pp", "pp,pp", "pp,tree", "pp-r2,specpipe", "pp,specpipe-r", "pp,specpipe,specpipe-r2"])
def test_main_refuses_arms_it_cannot_compare(arms) -> None:
    with pytest.raises(SystemExit):
        interleaved.main(["--arms", arms])
