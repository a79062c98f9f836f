"""Wire messages: round trips, and every malformed input is a ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ProtocolError
from shared.messages import SCHEMA_VERSION, RequestMsg, TokensMsg, decode
from shared.tensor_wire import decode_tensor, encode_tensor

pytestmark = pytest.mark.unit


def test_request_round_trip() -> None:
    msg = RequestMsg("r1", [1, 2, 3], 16, temperature=0.7, top_p=0.9, top_k=40, seed=5, stop_ids=[2], policy="tree")
    assert decode(msg.encode()) == msg
    assert decode(msg.encode(), expect=RequestMsg) == msg


def test_defaults_fill_missing_optional_fields() -> None:
    raw = msgpack.packb({"v": SCHEMA_VERSION, "type": "request", "request_id": "a", "prompt_ids": [1], "max_new_tokens": 2})
    assert decode(raw) == RequestMsg("a", [1], 2)


def _raw(**changes) -> bytes:
    body = {"v": SCHEMA_VERSION, "type": "request", "request_id": "a", "prompt_ids": [1], "max_new_tokens": 2}
    body.update(changes)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...})


MALFORMED = {
    "not-msgpack": b"\xc1\xc1\xc1",
    "not-a-map": msgpack.packb([1, 2, 3]),
    "wrong-version": _raw(v=99),
    "unknown-type": _raw(type="launch-missiles"),
    "missing-field": _raw(request_id=...),
    "wrong-field-type": _raw(max_new_tokens="lots"),
    "bool-for-int": _raw(max_new_tokens=True),
    "bad-list-item": _raw(prompt_ids=[1, "x"]),
    "truncated": RequestMsg("a", [1, 2], 3).encode()[:-3],
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_messages_raise_protocol_error(case) -> None:
    with pytest.raises(ProtocolError):
        decode(MALFORMED[case])


def test_expect_rejects_other_type() -> None:
    with pytest.raises(ProtocolError, match="unexpected message type"):
        decode(TokensMsg("a", [1]).encode(), expect=RequestMsg)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64], ids=str)
def test_tensor_round_trip(dtype) -> None:
    t = (torch.randn(3, 5) * 100).to(dtype)
    back = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(t))))
    assert back.dtype == dtype and torch.equal(back, t)


def test_malformed_tensor() -> None:
    with pytest.raises(ProtocolError):
        decode_tensor({"dtype": "float32", "shape": [4, 4], "data": b"\x00" * 3})
