"""Admission alone: the waiting queue's limit, KV-slot accounting in arrival order, slots, withdraw/release."""

from __future__ import annotations

import pytest

from scheduler.admission import Admission, AdmissionConfig
from scheduler.scheduler import Request

pytestmark = pytest.mark.unit


def _request(rid: str, prompt_len: int = 4) -> Request:
    return Request(rid, tuple(range(prompt_len)), max_new_tokens=4)


def _capacity(request: Request) -> int:
    return len(request.prompt) * 10  # made-up KV needs: 10 slots per prompt token


def test_queue_limit_refuses_past_max_queue() -> None:
    a = Admission(AdmissionConfig(max_queue=2, kv_slots=1000))
    assert a.offer(_request("a"), 0.0) and a.offer(_request("b"), 1.0)
    assert not a.offer(_request("c"), 2.0)
    assert list(a.waiting_since()) == ["a", "b"]


# label: (kv slots, prompt lengths in arrival order) -> admitted ids (in order), still waiting
ADMITS = {
    "all fit": (1000, [4, 4, 4], ["r0", "r1", "r2"], []),
    "the first that does not fit blocks the rest (arrival order)": (100, [4, 8, 1], ["r0"], ["r1", "r2"]),
    "nothing fits": (30, [4, 1], [], ["r0", "r1"]),
}


@pytest.mark.parametrize("case", list(ADMITS))
def test_admit_in_arrival_order_while_kv_fits(case) -> None:
    slots, lengths, admitted, waiting = ADMITS[case]
    a = Admission(AdmissionConfig(max_queue=10, kv_slots=slots))
    for i, n in enumerate(lengths):
        a.offer(_request(f"r{i}", n), float(i))
    got = a.admit(_capacity)
    assert [x.request.request_id for x in got] == admitted
    assert [x.slot for x in got] == list(range(len(admitted)))  # link slots are handed out once, in order
    assert list(a.waiting_since()) == waiting
    assert a.used == sum(x.capacity for x in got)


def test_release_frees_kv_for_the_next_waiting_request() -> None:
    a = Admission(AdmissionConfig(max_queue=10, kv_slots=50))
    a.offer(_request("a", 4), 0.0)
    a.offer(_request("b", 4), 1.0)
    assert [x.request.request_id for x in a.admit(_capacity)] == ["a"]
    a.release("a")
    got = a.admit(_capacity)
    assert [(x.request.request_id, x.slot) for x in got] == [("b", 1)]


def test_withdraw_only_takes_waiting_requests() -> None:
    a = Admission(AdmissionConfig(max_queue=10, kv_slots=40))
    a.offer(_request("running", 4), 0.0)
    a.admit(_capacity)
    a.offer(_request("waiting", 4), 1.0)
    assert not a.withdraw("running") and not a.withdraw("other") and a.withdraw("waiting")
    assert a.waiting_since() == {} and a.used == 40
