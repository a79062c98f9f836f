"""The rendezvous of a pipeline run: stage 0's store on a free or fixed port, re-hosted at once after a run ends,
and a wait for missing peers that gives up when the run is no longer wanted."""

from __future__ import annotations

import gc

import pytest

from specpipe.cluster import free_port
from stage_worker.link import LinkConfig, RendezvousAbandoned, host_store, join_store, wait_for_peers

pytestmark = pytest.mark.unit


def test_port_zero_picks_a_free_port_the_peers_can_join() -> None:
    cfg = LinkConfig(0, 2, master_port=0, rendezvous_s=5)
    store = host_store(cfg)
    assert store.port > 0
    peer = join_store(LinkConfig(1, 2, rendezvous_s=5), "127.0.0.1", store.port)
    peer.set("hello", "run")
    assert store.get("hello") == b"run"


def test_a_fixed_port_is_hosted_again_right_after_the_run_before() -> None:
    cfg = LinkConfig(0, 2, master_port=free_port(), rendezvous_s=5)
    for _ in range(3):  # run after run on the same port, as a re-forming pipeline with --master-port does
        store = host_store(cfg)
        assert store.port == cfg.master_port
        del store
        gc.collect()


# label: (peers that arrive, whether the run is still wanted) -> outcome
WAITS = {
    "every peer arrives": (2, True, None),
    "a peer is missing and the run moved on": (1, False, RendezvousAbandoned),
}


@pytest.mark.parametrize("case", list(WAITS))
def test_wait_for_peers(case) -> None:
    arrive, wanted, raises = WAITS[case]
    store = host_store(LinkConfig(0, 2, rendezvous_s=5))
    if arrive == 2:
        store.add("arrived", 1)  # the other stage got there first
    if raises is None:
        wait_for_peers(store, 2, lambda: wanted, poll_s=0.01)
        assert store.add("arrived", 0) == 2
    else:
        with pytest.raises(raises):
            wait_for_peers(store, 2, lambda: wanted, poll_s=0.01)
