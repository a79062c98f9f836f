"""A bounded in-memory record of recent requests, for GET /v1/requests/{id} and the gauges."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

QUEUED, RUNNING, FINISHED = "queued", "running", "finished"
CANCELLED, FAILED = "cancelled", "failed"  # what a status reply says of a request that ended without completing
OPENAI_FINISH_REASONS = ("stop", "length")  # the ones of OpenAI's set this server produces


def public_status(status: str, reason: str | None) -> tuple[str, str | None]:
    """(status, finish_reason) as replies show them: finish_reason only from OpenAI's set; a request that ended
    otherwise is `cancelled` (the cancel endpoint, a client gone) or `failed` (timeout, error, queue full)."""
    if status != FINISHED or reason in OPENAI_FINISH_REASONS:
        return status, reason if status == FINISHED else None
    return (CANCELLED if reason == "cancelled" else FAILED), None


@dataclass
class RequestRecord:
    """What the gateway knows about one request: status moves queued -> running -> finished."""

    request_id: str
    model: str
    prompt_tokens: int
    created: float = field(default_factory=time.time)
    status: str = QUEUED  # queued until its first tokens arrive (prefill counts as queued)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # the gateway's reason (stop, length, cancelled, timeout, error, queue_full)
    error: str | None = None
    entry_id: str | None = None  # its RequestMsg's id in the requests stream (queue time)

    def to_json(self) -> dict:
        status, finish_reason = public_status(self.status, self.finish_reason)
        return {
            "id": self.request_id, "object": "request.status", "model": self.model, "created": int(self.created),
            "status": status, "finish_reason": finish_reason, "error": self.error,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
            "tokens": list(self.tokens), "text": self.text,
        }


class RecordBook:
    """The last `limit` requests by id (oldest forgotten first)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()

    def add(self, record: RequestRecord) -> None:
        self._records[record.request_id] = record
        self._records.move_to_end(record.request_id)
        while len(self._records) > self.limit:
            self._records.popitem(last=False)

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def count(self, status: str) -> int:
        return sum(1 for r in self._records.values() if r.status == status)
