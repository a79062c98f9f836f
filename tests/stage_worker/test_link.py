"""The rendezvous of a pipeline run: stage 0's store on a free or fixed port, re-hosted at once after a run ends,
and a wait for missing peers that gives up when the run is no longer wanted. The payload: meta and states of any
dtype packed as bytes and viewed back bit for bit; a micro-batch over the CPU link's real sockets (two stages in
one process here; two real processes: test_link_tcp.py)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from shared.types.errors import ProtocolError
from specpipe.cluster import free_port
from stage_worker.link import (
    ActivationLink,
    LinkConfig,
    RendezvousAbandoned,
    host_store,
    join_store,
    pack,
    payload_size,
    unpack,
    wait_for_peers,
)
from tests.stage_worker.payloads import HIDDEN, SLOTS, batch_of, loopback_link, random_bits, same_bits

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


# ---- the payload ------------------------------------------------------------------------------------------------

# label: (dtype, rows)
PAYLOADS = {
    "float32, 3 rows": (torch.float32, 3),
    "bfloat16, 5 rows": (torch.bfloat16, 5),
    "float16, 2 rows": (torch.float16, 2),
    "one row": (torch.bfloat16, 1),
}


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_pack_then_unpack_gives_back_meta_and_bits(case) -> None:
    dtype, rows = PAYLOADS[case]
    meta = torch.arange(rows * 6, dtype=torch.int64).view(rows, 6) * -(2 ** 40)  # needs all 8 bytes
    states = random_bits(rows, HIDDEN, dtype)
    payload = pack(meta, states)
    assert payload.dtype == torch.uint8 and payload.numel() == payload_size(rows, HIDDEN, dtype)
    got_meta, got_states = unpack(payload, rows, HIDDEN, dtype)
    assert torch.equal(got_meta, meta) and same_bits(got_states, states)
    assert got_states.data_ptr() == payload.data_ptr() + rows * 6 * 8  # a view of the payload, not a copy


def test_a_payload_of_the_wrong_size_is_refused() -> None:
    payload = pack(torch.zeros(2, 6, dtype=torch.int64), random_bits(2, HIDDEN, torch.float32))
    with pytest.raises(ProtocolError, match="payload"):
        unpack(payload, 2, HIDDEN, torch.bfloat16)  # the peer computes in another dtype


# label: (dtype, rows)
MESSAGES = {
    "bfloat16": (torch.bfloat16, 5),
    "float16": (torch.float16, 2),
    "float32": (torch.float32, 3),
    "an empty batch": (torch.float32, 0),
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_the_dist_wire_sends_a_header_and_at_most_one_payload(case, monkeypatch) -> None:
    """The GPU's wire (torch.distributed), here under gloo: test_link_cuda.py runs it under NCCL."""
    dtype, rows = MESSAGES[case]
    link, wire = loopback_link(monkeypatch, "cpu", dtype)
    try:
        sent = batch_of(rows, dtype)
        link.send(1, sent, SLOTS)
        assert [t.dtype for t in wire.sent] == [torch.int64] + [torch.uint8] * (rows > 0)
        got = link.recv(2, {slot: rid for rid, slot in SLOTS.items()})
    finally:
        link.close()
    assert (got.batch_id, got.rows) == (sent.batch_id, sent.rows)
    assert same_bits(got.hidden, sent.hidden.reshape(rows, HIDDEN))


def _link_pair(dtype: torch.dtype) -> tuple[ActivationLink, ActivationLink]:
    """Stage 0 and stage 1 of one run, in this process, formed at once (each waits for the other's address)."""
    store, links = torch.distributed.HashStore(), {}

    def form(rank: int) -> None:
        links[rank] = ActivationLink(LinkConfig(rank, 2, rendezvous_s=10), torch.device("cpu"), dtype, HIDDEN, store)

    threads = [threading.Thread(target=form, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return links[0], links[1]


@pytest.mark.parametrize("case", list(MESSAGES))
def test_a_micro_batch_crosses_the_cpu_link_bit_for_bit(case) -> None:
    dtype, rows = MESSAGES[case]
    first, second = _link_pair(dtype)
    try:
        assert first.backend == second.backend == "tcp"
        sent = [batch_of(rows, dtype, seed=s) for s in (0, 1)]
        for step, batch in enumerate(sent, start=1):  # two steps in flight: they arrive in order
            first.send(step, batch, SLOTS)
        got = [second.recv(step + 1, {slot: rid for rid, slot in SLOTS.items()}) for step in (1, 2)]
    finally:
        first.close()
        second.close()
    for g, s in zip(got, sent):
        assert (g.batch_id, g.rows) == (s.batch_id, s.rows)
        assert same_bits(g.hidden, s.hidden.reshape(rows, HIDDEN))


def test_a_step_out_of_order_on_the_link_is_a_protocol_error() -> None:
    first, second = _link_pair(torch.float32)
    try:
        first.send(5, batch_of(2, torch.float32), SLOTS)
        with pytest.raises(ProtocolError, match="got step 5"):
            second.recv(2, {slot: rid for rid, slot in SLOTS.items()})
    finally:
        first.close()
        second.close()
