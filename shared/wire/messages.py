"""The wire: every message between processes, a typed msgspec Struct defined once, validated on decode.

Every message is a msgpack map {"type": NAME, "v": SCHEMA_VERSION, ...fields};
nested parts (admitted requests, pipeline events, tree nodes) are Structs too.
Decoding checks the version, the type and every field's type and raises
ProtocolError on anything else, so a malformed message is logged and dropped
by the receiver instead of crashing it. Nothing is ever pickled. No torch
import here: the gateway uses these types without torch.

Streams, inboxes and who writes them (the documented router/shard contract):
    requests        gateway -> scheduler     RequestMsg
    (control path)  scheduler -> stages      StepMsg (one per pipeline step, to each stage's inbox; a trace on the
                                             `steps` stream with --trace-steps)
    draft_events    scheduler -> drafts      DraftEventsMsg (a step's events, before the jobs that need them)
    (control path)  last stage -> scheduler  VerifyMsg (to the scheduler's inbox)
    draft_jobs      scheduler -> drafts      ExpansionJobMsg
    (control path)  drafts -> scheduler      ProposalsMsg (to the scheduler's inbox)
    errors          stages -> scheduler      StageErrorMsg
    cancel          gateway -> scheduler     CancelMsg
    out:{request}   scheduler -> gateway     TokensMsg
    occupancy       scheduler -> gateway     OccupancyMsg (the dashboard's stage x step grid)
    stats (a key)   scheduler -> gateway     SchedulerStatsMsg (overwritten; metrics and dashboard)
    stats:stage-k   stage k -> gateway       StageStatsMsg (overwritten; metrics and dashboard)
The control path (shared/transport/control.py) carries the same bytes as a stream
entry's "m" field, one message per frame. Stage k -> stage k+1 activations travel
over NCCL (GPUs) or a TCP inbox (CPUs): LinkHeader and LinkRow below describe the
int64 values that precede the hidden states.
"""

from __future__ import annotations

import functools
from typing import Any, Union

import msgspec

from shared.types.batch import PipelineEvent, Row, TargetTokens, TokenLogprob
from shared.types.config import SamplingParams
from shared.types.errors import ProtocolError
from shared.types.speculation import NodeRef

# 2: sampling settings travel as one nested map (RequestMsg.sampling, AdmittedRequest.sampling)
# 3: processing (min_p, penalties, logit_bias, grammar) and logprobs in it: an older stage would ignore them
SCHEMA_VERSION = 3
COMMITTED, NEEDS_TARGET = 1, 2  # row flags (StepMsg.flags, LinkRow.flags)


def pack_flags(row: Row) -> int:
    return (COMMITTED if row.committed else 0) | (NEEDS_TARGET if row.needs_target else 0)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every stream message; subclasses name their `type` with tag=."""

    v: int = SCHEMA_VERSION  # readers refuse another schema version

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    def to_json(self) -> dict[str, Any]:
        """The fields as plain data (for JSON replies such as the dashboard's)."""
        out = msgspec.to_builtins(self)
        out.pop("type", None)
        out.pop("v", None)
        return out


class SamplingFields(msgspec.Struct, frozen=True):
    """A request's sampling settings, spelled out once: the gateway sends them, the last stage picks with them
    (SamplingParams documents each; validated there)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0  # the token at output position i is drawn with a generator seeded by (seed, i)
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0  # OpenAI's: over the generated tokens before each position
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: over prompt and generated tokens; 1 = off
    logit_bias: dict[int, float] = {}  # token id -> added to its logit (OpenAI's logit_bias)
    grammar: str | None = None  # llguidance grammar JSON (response_format): the last stage masks every node with it
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely (TokenLogprob)

    def params(self) -> SamplingParams:
        """Validated (SpecPipeError on a bad value)."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed, self.min_p, self.presence_penalty,
                              self.frequency_penalty, self.repetition_penalty, tuple(sorted(self.logit_bias.items())),
                              self.grammar, self.logprobs)

    @staticmethod
    def of(s: SamplingParams) -> SamplingFields:
        return SamplingFields(s.temperature, s.top_p, s.top_k, s.seed, s.min_p, s.presence_penalty,
                              s.frequency_penalty, s.repetition_penalty, dict(s.logit_bias), s.grammar, s.logprobs)


class AdmittedRequest(msgspec.Struct, frozen=True):
    """A request every stage registers before the step that first sends its rows (StepMsg.admitted)."""

    request_id: str
    slot: int  # its integer id in the activation link's rows (LinkRow.slot)
    prompt_len: int  # positions below it are the prompt (prefill attention)
    capacity: int  # KV slots each stage reserves for it
    sampling: SamplingFields = SamplingFields()  # the last stage draws target tokens with it


class LinkHeader(msgspec.Struct, frozen=True, array_like=True):
    """The int64[4] tensor stage k sends stage k+1 every step, before the rows."""

    step: int
    batch_id: int
    rows: int  # 0: nothing else follows
    hidden: int  # the hidden size the states will have


class LinkRow(msgspec.Struct, frozen=True, array_like=True):
    """One row of the int64[n, 6] meta, the first n * 48 bytes of the payload that follows a header with
    rows > 0 (the hidden states' bytes come after it; stage_worker/link.py)."""

    slot: int  # AdmittedRequest.slot
    node_id: int
    parent_id: int
    position: int
    token: int
    flags: int  # COMMITTED | NEEDS_TARGET

    @staticmethod
    def of(row: Row, slot: int) -> list[int]:
        return [slot, row.node_id, row.parent_id, row.position, row.token, pack_flags(row)]

    def row(self, request_id: str) -> Row:
        return Row(request_id, self.node_id, self.parent_id, self.position, self.token,
                   bool(self.flags & COMMITTED), bool(self.flags & NEEDS_TARGET))


class RequestMsg(Message, frozen=True, tag="request"):
    """A new request (gateway -> scheduler). The prompt is already tokenized."""

    request_id: str  # unique; names the output stream out:{request_id}
    prompt_ids: list[int]  # chat template already applied
    max_new_tokens: int
    sampling: SamplingFields = SamplingFields()
    stop_ids: list[int] = []  # end the request after emitting one of these
    policy: str | None = None  # per-request override of the server's speculation policy
    width: int | None = None  # per-request override of the tree width
    arrival: float = 0.0  # gateway wall-clock time, for queue-time metrics
    ignore_eos: bool = False  # the model's end-of-sequence ids do not end it (only stop_ids and the length do)


class TokensMsg(Message, frozen=True, tag="tokens"):
    """New accepted tokens of one request (scheduler -> gateway), in order."""

    request_id: str
    tokens: list[int]  # appended to the output, never revised (tokens are final when verified)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # a clear message when finish_reason == "error"
    step: int = 0  # pipeline step that produced them (speculation metrics)
    logprobs: list[TokenLogprob] = []  # one per token when the request asked for logprobs, else empty


class StepMsg(Message, frozen=True, tag="step"):
    """One pipeline step (scheduler -> every stage; the drafts get its events first, as a DraftEventsMsg).

    Stages apply `events` and register `admitted` before computing this step, so
    no stage ever computes a node that verification already pruned. Stage 0
    takes its micro-batch from the row columns; stage k > 0 receives stage
    k-1's output of the previous step over torch.distributed.
    """

    step: int  # the scheduler's step number, consecutive from 1 (a run starts at its base_step + 1)
    batch_id: int  # identifies stage 0's micro-batch; comes back in VerifyMsg
    events: list[PipelineEvent] = []  # [request_id, "commit"|"prune"|"finish", [node ids]] of the last verification
    admitted: list[AdmittedRequest] = []  # new requests: registered before this step's rows
    request_ids: list[str] = []  # stage 0's rows as columns, one entry per row (see rows())
    node_ids: list[int] = []
    parent_ids: list[int] = []
    positions: list[int] = []
    tokens: list[int] = []
    flags: list[int] = []  # COMMITTED | NEEDS_TARGET
    epoch: int = 0  # the pipeline run (shared/transport/membership.py): a reader refuses a step of a run it is not in

    @staticmethod
    def columns(rows: list[Row]) -> dict[str, list]:
        """Stage 0's rows as the message's columns."""
        return {"request_ids": [r.request_id for r in rows], "node_ids": [r.node_id for r in rows],
                "parent_ids": [r.parent_id for r in rows], "positions": [r.position for r in rows],
                "tokens": [r.token for r in rows], "flags": [pack_flags(r) for r in rows]}

    def rows(self) -> list[Row]:
        return [Row(rid, node, parent, pos, tok, bool(f & COMMITTED), bool(f & NEEDS_TARGET))
                for rid, node, parent, pos, tok, f in zip(self.request_ids, self.node_ids, self.parent_ids,
                                                          self.positions, self.tokens, self.flags)]


class VerifyMsg(Message, frozen=True, tag="verify"):
    """What left the last stage at `step` (last stage -> scheduler)."""

    step: int
    batch_id: int  # the stage-0 batch these rows entered with
    request_ids: list[str]
    node_ids: list[int]
    targets: list[int]  # the target's token after each row (argmax or seeded draw); -1 if not asked
    compute_s: float = 0.0  # the last stage's compute time for this step (overhead accounting)
    epoch: int = 0  # the run of `step` (step numbers restart when a new scheduler starts)
    logprobs: list[TokenLogprob | None] = []  # per row when some row's request asked for logprobs, else empty

    def target_tokens(self) -> TargetTokens:
        return TargetTokens(self.batch_id, self.request_ids, self.node_ids, self.targets, self.logprobs)


class DraftEventsMsg(Message, frozen=True, tag="draft_events"):
    """The events every stage applies before `step` (the StepMsg of `step` carries the same ones), sent to the
    draft workers before that step is scheduled (scheduler -> drafts). A miss's refill needs R levels drafted
    below the bonus token before its step can go out; the drafts learn the miss's prunes here first, so those
    levels are drafted on the tree the stages will have. Published when there are events, and once as a run
    begins (step = its base step, no events: the drafts start the run empty)."""

    step: int  # the step these events precede
    events: list[PipelineEvent] = []
    epoch: int = 0  # the pipeline run; a newer one resets the drafts


class ExpansionJobMsg(Message, frozen=True, tag="expand"):
    """Propose children for tree nodes (scheduler -> draft workers). With no nodes: a request just admitted, whose
    prompt (`text`) the draft computes now, while the stages prefill it, instead of at its first expansion."""

    request_id: str
    as_of_step: int  # apply the DraftEventsMsg records up to this step first: events and the job stay in order
    text: list[int]  # accepted tokens (prompt + output)
    nodes: list[NodeRef]  # [node_id, parent_id, token, position, accepted]
    top_k: int
    capacity: int  # KV slots the draft reserves for this request
    epoch: int = 0  # the run of `as_of_step` (step numbers restart when a new scheduler starts)


class ProposalsMsg(Message, frozen=True, tag="proposals"):
    """Draft children for one node (draft worker -> scheduler); empty = none."""

    request_id: str
    node_id: int
    tokens: list[int]
    logprobs: list[float]
    # the draft forward that drafted it, on the first answer of each forward only (0: not this one): its frontier
    # nodes and seconds, the draft's pace for a width plan whose pipe never waits for the draft
    forward_nodes: int = 0
    forward_s: float = 0.0


class StageErrorMsg(Message, frozen=True, tag="stage_error"):
    """A stage could not compute some requests' rows (stage -> scheduler); they are failed cleanly."""

    stage: int
    step: int
    request_ids: list[str]
    error: str
    link_lost: bool = False  # the stage lost a peer: every in-flight request fails and the pipeline re-forms


class CancelMsg(Message, frozen=True, tag="cancel"):
    """Stop a request now (gateway -> scheduler): a client went away or asked to cancel."""

    request_id: str


class OccupancyMsg(Message, frozen=True, tag="occupancy"):
    """One final column of the stage x step grid (scheduler -> dashboard); see scheduler/occupancy.py."""

    step: int
    stages: list[list]  # per stage: [[request_id, useful rows, wasted rows], ...]; [] is a pipeline bubble


class SchedulerStatsMsg(Message, frozen=True, tag="scheduler_stats"):
    """The scheduler's state, overwritten about twice a second (scheduler -> gateway /metrics, /dashboard).

    Counts are cumulative since the scheduler started (Prometheus counters);
    lists are capped so the message stays small under any load.
    """

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
    speculating: bool = False  # the width plan in force lets some request speculate; False: plain decoding, PP's
    # rows (nobody speculates, or the mode check measured plain decoding faster: scheduler/mode_check.py)
    mode_rates: dict[str, float] = {}  # the mode check's measured tokens/s, "spec@4" / "plain@4" (mode @ load bucket):
    # why it chose the mode in force


class StageStatsMsg(Message, frozen=True, tag="stage_stats"):
    """One stage's own state, overwritten about twice a second (stage -> gateway /metrics, /dashboard): what only
    the stage knows, the KV its requests hold (shared/compute/kv_cache.py: KVUse says what the numbers mean)."""

    time: float  # stage wall clock at writing: readers ignore a stale snapshot (a stage that is gone)
    stage: int  # the stage's rank: the per-stage series' label, and which stage is fullest
    requests: int  # requests registered on this stage: with kv_reserved, the size of a typical reservation
    kv_reserved: int  # KV slots allocated to those requests: the numerator of kv_cache_usage_perc
    kv_filled: int  # of them, slots holding KV now: how much of the reservations is used (the dashboard)
    kv_slots: int  # the budget, the scheduler's --kv-slots (0: unknown): the denominator
    kv_usage: float  # kv_reserved / kv_slots capped at 1, computed where the unit is defined: vllm:kv_cache_usage_perc


MESSAGES = (RequestMsg, TokensMsg, StepMsg, VerifyMsg, DraftEventsMsg, ExpansionJobMsg, ProposalsMsg, StageErrorMsg,
            CancelMsg, OccupancyMsg, SchedulerStatsMsg, StageStatsMsg)
_ENCODER = msgspec.msgpack.Encoder()


@functools.cache
def _decoder(expect: type[Message] | None) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(expect if expect is not None else Union[MESSAGES])  # noqa: UP007


def decode(data: bytes, expect: type[Message] | None = None) -> Message:
    """Bytes -> a validated message (of type `expect` when given); ProtocolError on anything unexpected."""
    try:
        msg = _decoder(expect).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc
    if msg.v != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {msg.v!r} (expected {SCHEMA_VERSION})")
    return msg
