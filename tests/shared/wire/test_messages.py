"""Wire messages: round trips, the msgpack shapes other processes read, and every malformed input is a
ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.types.errors import ProtocolError
from shared.types.batch import PipelineEvent, Row, TokenLogprob
from shared.types.config import SamplingParams
from shared.types.speculation import NodeRef
from shared.wire.messages import (
    SCHEMA_VERSION,
    AdmittedRequest,
    ExpansionJobMsg,
    LinkRow,
    RequestMsg,
    SamplingFields,
    StageStatsMsg,
    StepMsg,
    TokensMsg,
    VerifyMsg,
    decode,
)

pytestmark = pytest.mark.unit


def test_request_round_trip() -> None:
    msg = RequestMsg("r1", [1, 2, 3], 16, SamplingFields(0.7, 0.9, 40, 5), stop_ids=[2], policy="tree")
    assert decode(msg.encode()) == msg
    assert decode(msg.encode(), expect=RequestMsg) == msg


def test_every_sampling_setting_survives_the_wire() -> None:
    params = SamplingParams(0.7, 0.9, 40, 5, min_p=0.1, presence_penalty=-1.0, frequency_penalty=0.5,
                            repetition_penalty=1.2, logit_bias=((3, -100.0), (9, 2.5)), grammar='{"grammars": []}',
                            logprobs=4)
    msg = RequestMsg("r1", [1], 4, SamplingFields.of(params), ignore_eos=True)
    back = decode(msg.encode(), expect=RequestMsg)
    assert back.sampling.params() == params and back.ignore_eos


def test_logprobs_travel_with_targets_and_tokens() -> None:
    lp = TokenLogprob(-0.5, [7, 3], [-0.5, -1.25])
    verify = VerifyMsg(step=1, batch_id=2, request_ids=["a", "b"], node_ids=[0, 1], targets=[7, 9], logprobs=[lp, None])
    assert decode(verify.encode()).target_tokens().logprobs == [lp, None]
    tokens = TokensMsg(request_id="a", tokens=[7], logprobs=[lp])
    assert decode(tokens.encode()) == tokens
    assert msgpack.unpackb(tokens.encode())["logprobs"] == [[-0.5, [7, 3], [-0.5, -1.25]]]  # compact: arrays


def test_stage_stats_round_trip() -> None:
    msg = StageStatsMsg(time=1.5, stage=1, requests=2, kv_reserved=300, kv_filled=40, kv_slots=1000, kv_usage=0.3)
    assert decode(msg.encode(), expect=StageStatsMsg) == msg
    assert msg.to_json()["kv_usage"] == 0.3


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
    "event-of-unknown-kind": msgpack.packb({"v": 1, "type": "step", "step": 1, "batch_id": 1,
                                            "events": [["r", "explode", []]]}),
    "event-not-a-triple": msgpack.packb({"v": 1, "type": "step", "step": 1, "batch_id": 1, "events": [["r"]]}),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_messages_raise_protocol_error(case) -> None:
    with pytest.raises(ProtocolError):
        decode(MALFORMED[case])


def test_expect_rejects_other_type() -> None:
    with pytest.raises(ProtocolError, match="malformed message"):
        decode(TokensMsg("a", [1]).encode(), expect=RequestMsg)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


def test_step_msgpack_shape() -> None:
    """Events travel as [request, kind, [nodes]], admitted requests as maps, rows as columns."""
    rows = [Row("r", 3, -1, 7, 42, False, True), Row("r", 4, 3, 8, 9, True, False)]
    admitted = AdmittedRequest("r", 0, 7, 64, SamplingFields(temperature=0.5, seed=3))
    msg = StepMsg(step=2, batch_id=5, events=[PipelineEvent("q", "prune", (1, 2))], admitted=[admitted],
                  epoch=4, **StepMsg.columns(rows))
    body = msgpack.unpackb(msg.encode())
    assert body["type"] == "step" and body["v"] == SCHEMA_VERSION
    assert body["events"] == [["q", "prune", [1, 2]]] and body["flags"] == [2, 1]
    assert body["admitted"][0]["sampling"]["temperature"] == 0.5 and body["admitted"][0]["slot"] == 0
    back = decode(msg.encode(), expect=StepMsg)
    assert back == msg and back.rows() == rows and back.admitted[0].sampling.params().seed == 3


def test_job_nodes_and_link_rows() -> None:
    job = ExpansionJobMsg(request_id="r", as_of_step=3, text=[1, 2], nodes=[NodeRef(5, -1, 9, 2, True)], top_k=4,
                          capacity=16)
    assert msgpack.unpackb(job.encode())["nodes"] == [[5, -1, 9, 2, True]]
    assert decode(job.encode(), expect=ExpansionJobMsg).nodes[0].accepted is True
    row = Row("r", 4, 3, 8, 9, True, False)
    assert LinkRow(*LinkRow.of(row, slot=7)).row("r") == row
