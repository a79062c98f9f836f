"""Wire messages between processes: msgpack maps with an explicit schema.

Every message is a map {"v": SCHEMA_VERSION, "type": NAME, ...fields}. Decoding
checks the version, the type and every field's type, and raises ProtocolError
on anything else, so a malformed message is logged and dropped by the
receiver instead of crashing it. Nothing is ever pickled; tensors (where a
message needs one) use shared/tensor_wire.py. No torch import here: the
gateway uses these schemas without torch.

Streams and who writes them (the documented router/shard contract):
    requests        gateway -> scheduler     RequestMsg
    steps           scheduler -> stages      StepMsg (one per pipeline step)
    verify          last stage -> scheduler  VerifyMsg
    draft_jobs      scheduler -> drafts      ExpansionJobMsg
    proposals       drafts -> scheduler      ProposalsMsg
    errors          stages -> scheduler      StageErrorMsg
    cancel          gateway -> scheduler     CancelMsg
    out:{request}   scheduler -> gateway     TokensMsg
    occupancy       scheduler -> gateway     OccupancyMsg (the dashboard's stage x step grid)
    stats (a key)   scheduler -> gateway     SchedulerStatsMsg (overwritten; metrics and dashboard)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from shared.errors import ProtocolError

SCHEMA_VERSION = 1
@dataclass(frozen=True)
class Message:
    """Base: subclasses are frozen dataclasses with a TYPE name and typed fields."""

    TYPE: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON replies such as the dashboard's)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def encode(self) -> bytes:
        body = {"v": SCHEMA_VERSION, "type": self.TYPE, **self.to_json()}
        return msgpack.packb(body, use_bin_type=True)


_REGISTRY: dict[str, type[Message]] = {}


def message(cls: type[Message]) -> type[Message]:
    """Register a message class by its TYPE."""
    _REGISTRY[cls.TYPE] = cls
    return cls


def decode(data: bytes, expect: type[Message] | None = None) -> Message:
    """Bytes -> a validated message; ProtocolError on anything unexpected."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"not a msgpack message: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    if body.get("v") != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {body.get('v')!r} (expected {SCHEMA_VERSION})")
    cls = _REGISTRY.get(body.get("type"))
    if cls is None or (expect is not None and cls is not expect):
        raise ProtocolError(f"unexpected message type {body.get('type')!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.TYPE}: missing field '{f.name}'")
            continue
        values[f.name] = _check(body[f.name], hints[f.name], f"{cls.TYPE}.{f.name}")
    return cls(**values)


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate value against a type hint (int, float, str, bool, bytes, dict, list[...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        return [_check(v, args[0], where) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


# ---- the messages ---------------------------------------------------------------------------


@message
@dataclass(frozen=True)
class RequestMsg(Message):
    """A new request (gateway -> scheduler). The prompt is already tokenized."""

    TYPE: ClassVar[str] = "request"
    request_id: str  # unique; names the output stream out:{request_id}
    prompt_ids: list[int]  # chat template already applied
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0  # the token at output position i is drawn with a generator seeded by (seed, i)
    stop_ids: list[int] = field(default_factory=list)  # end the request after emitting one of these
    policy: str | None = None  # per-request override of the server's speculation policy
    width: int | None = None  # per-request override of the tree width
    arrival: float = 0.0  # gateway wall-clock time, for queue-time metrics


@message
@dataclass(frozen=True)
class TokensMsg(Message):
    """New accepted tokens of one request (scheduler -> gateway), in order."""

    TYPE: ClassVar[str] = "tokens"
    request_id: str
    tokens: list[int]  # appended to the output, never revised (tokens are final when verified)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # a clear message when finish_reason == "error"
    step: int = 0  # pipeline step that produced them (speculation metrics)


@message
@dataclass(frozen=True)
class StepMsg(Message):
    """One pipeline step (scheduler -> every stage and draft worker).

    Stages apply `events` and register `admitted` before computing this step, so
    no stage ever computes a node that verification already pruned. Stage 0
    takes its micro-batch from the row columns; stage k > 0 receives stage
    k-1's output of the previous step over torch.distributed.
    """

    TYPE: ClassVar[str] = "step"
    step: int  # the scheduler's step number, consecutive from 1 (a run starts at its base_step + 1)
    batch_id: int  # identifies stage 0's micro-batch; comes back in VerifyMsg
    events: list[list]  # [request_id, "commit"|"prune"|"finish", [node ids]] from the last verification
    admitted: list[dict] = field(default_factory=list)  # new requests: see AdmittedRequest.to_wire
    request_ids: list[str] = field(default_factory=list)  # stage 0 rows, one entry per row ...
    node_ids: list[int] = field(default_factory=list)
    parent_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)  # bit 0 committed, bit 1 needs_target
    epoch: int = 0  # the pipeline run (shared/membership.py): a reader refuses a step of a run it is not in


@message
@dataclass(frozen=True)
class VerifyMsg(Message):
    """What left the last stage at `step` (last stage -> scheduler)."""

    TYPE: ClassVar[str] = "verify"
    step: int
    batch_id: int  # the stage-0 batch these rows entered with
    request_ids: list[str]
    node_ids: list[int]
    targets: list[int]  # the target's token after each row (argmax or seeded draw); -1 if not asked
    compute_s: float = 0.0  # the last stage's compute time for this step (overhead accounting)
    epoch: int = 0  # the run of `step` (step numbers restart when a new scheduler starts)


@message
@dataclass(frozen=True)
class ExpansionJobMsg(Message):
    """Propose children for tree nodes (scheduler -> draft workers)."""

    TYPE: ClassVar[str] = "expand"
    request_id: str
    as_of_step: int  # apply step records up to here first: events and the job stay causally ordered
    text: list[int]  # accepted tokens (prompt + output)
    nodes: list[list[int]]  # [node_id, parent_id, token, position, accepted(0/1)]
    top_k: int
    capacity: int  # KV slots the draft reserves for this request
    epoch: int = 0  # the run of `as_of_step` (step numbers restart when a new scheduler starts)


@message
@dataclass(frozen=True)
class ProposalsMsg(Message):
    """Draft children for one node (draft worker -> scheduler); empty = none."""

    TYPE: ClassVar[str] = "proposals"
    request_id: str
    node_id: int
    tokens: list[int]
    logprobs: list[float]


@message
@dataclass(frozen=True)
class StageErrorMsg(Message):
    """A stage could not compute some requests' rows (stage -> scheduler); they are failed cleanly."""

    TYPE: ClassVar[str] = "stage_error"
    stage: int
    step: int
    request_ids: list[str]
    error: str
    link_lost: bool = False  # the stage lost a peer: every in-flight request fails and the pipeline re-forms


@message
@dataclass(frozen=True)
class CancelMsg(Message):
    """Stop a request now (gateway -> scheduler): a client went away or asked to cancel."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str


@message
@dataclass(frozen=True)
class OccupancyMsg(Message):
    """One final column of the stage x step grid (scheduler -> dashboard); see scheduler/occupancy.py."""

    TYPE: ClassVar[str] = "occupancy"
    step: int
    stages: list[list]  # per stage: [[request_id, useful rows, wasted rows], ...]; [] is a pipeline bubble


@message
@dataclass(frozen=True)
class SchedulerStatsMsg(Message):
    """The scheduler's state, overwritten about twice a second (scheduler -> gateway /metrics, /dashboard).

    Counts are cumulative since the scheduler started (Prometheus counters);
    lists are capped so the message stays small under any load.
    """

    TYPE: ClassVar[str] = "scheduler_stats"
    time: float  # scheduler wall clock at writing: readers ignore a stale snapshot
    stages: int
    steps: int  # pipeline steps so far (the scheduler steps only while requests are active)
    num_waiting: int  # admitted to the queue, waiting for KV room
    waiting: list[list]  # [request_id, seconds waiting], oldest first (first 50)
    num_running: int
    running: list[list]  # [request_id, tokens generated, max_new_tokens, policy] (first 100)
    tokens: int  # tokens generated: accepted draft tokens + bonus tokens
    drafts: int  # speculative levels sent (vLLM's num_drafts)
    draft_tokens: int  # speculative nodes sent into the pipe
    accepted: int  # draft tokens that matched the target
    accepted_per_depth: list[int]  # accepted tokens by depth below the last bonus token
    pruned: int  # tree nodes dropped (sent or only drafted)
    stage_busy: list[float]  # per stage: fraction of steps it had rows to compute
    useful_rows: int  # rows computed (all stages) that were committed or accepted
    wasted_rows: int  # rows computed (all stages) that were later pruned
