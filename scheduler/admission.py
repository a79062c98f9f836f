"""Admission: the waiting queue and the KV-slot budget. Pure: no transport, no clock of its own.

A request first waits (refused past `max_queue`: "queue full", HTTP 429); it is
admitted, in arrival order, once its KV capacity fits the slots every stage
shares, and gets the integer slot that names it on the activation link.
Finishing, failing or cancelling a running request gives its KV back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scheduler.scheduler import Request


@dataclass(frozen=True)
class AdmissionConfig:
    max_queue: int = 256  # waiting requests beyond this are refused ("queue full" -> HTTP 429)
    kv_slots: int = 1 << 16  # KV slots per stage shared by admitted requests


@dataclass(frozen=True)
class Admitted:
    request: Request
    slot: int  # its id on the activation link (AdmittedRequest.slot)
    capacity: int  # KV slots it holds on every stage


class Admission:
    def __init__(self, cfg: AdmissionConfig):
        self.cfg = cfg
        self.waiting: deque[tuple[Request, float]] = deque()  # (request, arrival time), oldest first
        self.capacity: dict[str, int] = {}  # running request -> KV slots it holds
        self.next_slot = 0

    def offer(self, request: Request, now: float) -> bool:
        """Queue a request; False when the queue is full (the request is refused)."""
        if len(self.waiting) >= self.cfg.max_queue:
            return False
        self.waiting.append((request, now))
        return True

    def admit(self, capacity_of) -> list[Admitted]:
        """Every waiting request, in order, whose KV fits now (capacity_of(request) -> slots it needs)."""
        out = []
        while self.waiting:
            request, _ = self.waiting[0]
            need = capacity_of(request)
            if self.used + need > self.cfg.kv_slots:
                break  # waits until running requests free their KV
            self.waiting.popleft()
            self.capacity[request.request_id] = need
            out.append(Admitted(request, self.next_slot, need))
            self.next_slot += 1
        return out

    @property
    def used(self) -> int:
        return sum(self.capacity.values())

    def withdraw(self, request_id: str) -> bool:
        """Drop a waiting request (cancelled before it ran); False if it was not waiting."""
        for item in self.waiting:
            if item[0].request_id == request_id:
                self.waiting.remove(item)
                return True
        return False

    def release(self, request_id: str) -> None:
        """A running request left: its KV is free."""
        self.capacity.pop(request_id, None)

    def waiting_since(self) -> dict[str, float]:
        """Waiting request -> arrival time, oldest first (queue time for metrics and the dashboard)."""
        return {r.request_id: t for r, t in self.waiting}
