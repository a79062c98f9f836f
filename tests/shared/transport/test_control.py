"""The control path's inboxes and connections, over real sockets in one process."""

from __future__ import annotations

import time

import msgpack
import pytest

from shared.transport.control import ControlConfig, Inbox, Outbox
from shared.wire.messages import ProposalsMsg, StepMsg, VerifyMsg

pytestmark = pytest.mark.unit


def _drain(inbox: Inbox, n: int, timeout_s: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += inbox.recv(100)
    return got


@pytest.fixture
def inboxes():
    made = [Inbox(ControlConfig()) for _ in range(2)]
    yield made
    for inbox in made:
        inbox.close()


def test_every_inbox_gets_every_message_in_order(inboxes) -> None:
    out = Outbox([i.address for i in inboxes])
    sent = [StepMsg(step=s, batch_id=s, epoch=3) for s in range(1, 51)]
    for msg in sent:
        out.send(msg)
    try:
        assert all(_drain(i, len(sent)) == sent for i in inboxes)
    finally:
        out.close()


def test_messages_sent_together_arrive_as_sent_between_single_ones(inboxes) -> None:
    """send_all: many frames in one write (1500 of them, past sendmsg's 1024 iovecs), in order with the
    messages sent one at a time around them; none sent at all is no write."""
    out = Outbox([i.address for i in inboxes])
    together = [ProposalsMsg("r", n, [n], [-0.5]) for n in range(1500)]
    try:
        out.send(StepMsg(step=1, batch_id=1, epoch=3))
        out.send_all(together)
        out.send_all([])
        out.send(StepMsg(step=2, batch_id=2, epoch=3))
        expected = [StepMsg(step=1, batch_id=1, epoch=3), *together, StepMsg(step=2, batch_id=2, epoch=3)]
        assert all(_drain(i, len(expected)) == expected for i in inboxes)
    finally:
        out.close()


# label: frame bytes that are not a message of the wire
MALFORMED = {"not msgpack": b"\xc1\xc1", "a list": msgpack.packb([1, 2]), "another schema version":
             msgpack.packb({"v": 999, "type": "step"}), "empty": b""}


def test_malformed_frames_are_dropped_and_the_next_message_arrives(inboxes) -> None:
    out = Outbox([inboxes[0].address])
    for raw in MALFORMED.values():
        out.send_raw(raw)
    out.send(VerifyMsg(step=1, batch_id=1, request_ids=["r"], node_ids=[0], targets=[5]))
    try:
        assert _drain(inboxes[0], 1) == [VerifyMsg(step=1, batch_id=1, request_ids=["r"], node_ids=[0], targets=[5])]
    finally:
        out.close()


def test_a_large_frame_never_blocks_the_sender(inboxes) -> None:
    """A prefill's activations (tens of MB) to a peer that is not reading yet: send returns at once, the rest goes
    out from the connection's thread, and the frames arrive whole and in order."""
    big = bytes(range(256)) * (1 << 16)  # 16 MiB, more than a socket buffer takes
    out = Outbox([inboxes[0].address])
    try:
        start = time.monotonic()
        out.send_raw(b"head", big)
        out.send(ProposalsMsg("r", 1, [7], [-0.5]))
        assert time.monotonic() - start < 1.0
        frames, deadline = [], time.monotonic() + 20
        while len(frames) < 2 and time.monotonic() < deadline:
            frames += inboxes[0].recv_raw(100)
        assert bytes(frames[0]) == b"head" + big and len(frames) == 2
    finally:
        out.close()


def test_recv_waits_at_most_its_timeout(inboxes) -> None:
    start = time.monotonic()
    assert inboxes[0].recv(50) == [] and time.monotonic() - start < 1.0


def test_a_peer_restarted_on_its_port_is_reached_again() -> None:
    first = Inbox(ControlConfig())
    port = int(first.address.rsplit(":", 1)[1])
    out = Outbox([first.address])
    first.close()
    deadline = time.monotonic() + 5
    while out.connected and time.monotonic() < deadline:  # the peer is gone: sends fail, the connection breaks
        out.send(StepMsg(step=1, batch_id=1))
        time.sleep(0.01)
    assert not out.connected
    again = Inbox(ControlConfig(port=port))
    try:
        out.connect([again.address])  # the same address: made again, since the connection broke
        out.send(StepMsg(step=2, batch_id=2))
        assert _drain(again, 1) == [StepMsg(step=2, batch_id=2)]
    finally:
        out.close()
        again.close()
