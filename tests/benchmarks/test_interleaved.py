"""benchmarks.interleaved's arms: which cluster each names (the runs themselves: test_serving_smoke)."""

from __future__ import annotations

import pytest

from benchmarks import interleaved
from benchmarks.serving import ServingConfig

pytestmark = pytest.mark.unit

SHARED = interleaved.SHARED_TOKENS
# label: (arm, (policy, async scheduling, refill depth: None is the services' default, n-gram table across requests,
# layer split: measured, as `specpipe up` does, unless the arm names counts))
ARMS = {"plain pp": ("pp", ("pp", False, None, 0, "measured")),
        "specpipe": ("specpipe", ("specpipe", False, None, 0, "measured")),
        "specpipe, async": ("specpipe-async", ("specpipe", True, None, 0, "measured")),
        "specpipe, refill 2": ("specpipe-r2", ("specpipe", False, 2, 0, "measured")),
        "specpipe, async, refill 3": ("specpipe-async-r3", ("specpipe", True, 3, 0, "measured")),
        "specpipe, shared table": ("specpipe-shared", ("specpipe", False, None, SHARED, "measured")),
        "specpipe, refill 2, shared table": ("specpipe-r2-shared", ("specpipe", False, 2, SHARED, "measured")),
        "pp, layers 18 and 12": ("pp@18+12", ("pp", False, None, 0, "18,12")),
        "specpipe, refill 2, layers 10, 10, 10": ("specpipe-r2@10+10+10", ("specpipe", False, 2, 0, "10,10,10"))}


@pytest.mark.parametrize("case", list(ARMS))
def test_an_arm_names_its_cluster(case) -> None:
    arm, expected = ARMS[case]
    spec = interleaved.arm_spec(ServingConfig(), arm)
    assert (spec.policy, spec.async_scheduling, spec.refill_depth, spec.ngram_shared, spec.layer_split) == expected


@pytest.mark.parametrize("arms", ["pp", "pp,pp", "pp,tree", "pp-r2,specpipe", "pp,specpipe-r", "pp,specpipe,specpipe-r2",
                                  "pp-shared,specpipe", "specpipe,specpipe-shared-r2", "pp,specpipe@18",
                                  "pp,specpipe@18+", "pp@18+12-r2,specpipe"])
def test_main_refuses_arms_it_cannot_compare(arms) -> None:
    with pytest.raises(SystemExit):
        interleaved.main(["--arms", arms])
