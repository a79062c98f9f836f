"""Whether speculation pays, measured: SpecPipe-DB's check on its width plan.

The width plan (width.py) predicts what speculation yields from acceptance and
prices a step by the rows it plans. Both are models: a refill's rows are not
in its rows, acceptance comes in runs that its geometric cycle averages away,
and on a CPU a few-row step costs more than its row count says. Where the
model is wrong, speculating can be slower than plain decoding (PP), which is
what the plan exists to prevent.

So the scheduler also measures what each mode delivers: decoded tokens per
second (SPEC: the plan lets some request speculate; PLAIN: nobody does) over
the steps from 2 x stages steps after a switch (the pipe, and the
verifications it awaits, hold that mode's batches only) with no prompt rows
in the pipe, per number of decoding requests (by power of two: a mode is
compared at the load it was measured at). A plan that speculates is overruled
by the plain plan where plain decoding measured more than MARGIN faster
lately, and only there: rates within MARGIN of each other are a tie, and a tie
goes to the plan (a tie kept in plain decoding would turn a probe into a stretch
of plain decoding until speculation's rate went stale: on one request of mixed
prompts, most of its steps). Where plain decoding has not been measured lately
at this load, it is probed for MIN_STEPS measured steps. One request decoding
alone is measured as itself: a new lone request's speculation is measured
afresh (new_lone_request). A mode not measured for FRESH steps is measured
again: the plan's speculation, when it asks for it, or a probe of plain
decoding (LATER times less often where it lost by more than MARGIN).
Measurements age by the step (TAU), so the rates follow a changing mix of
prompts. A probe that measures nothing within PROBE_LIMIT steps (prompts in
every step: a busy server) gives way to the plan until the next one is due.

Cost of the check: a probe of about MIN_STEPS[PLAIN] + 2 x stages steps in plain mode
every FRESH steps, at the load where both were measured.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from scheduler.width import StepCosts

MARGIN = 0.05  # rates this close are a tie (noise): the plan's speculation stands
FRESH = 256  # steps after which a mode's rate is stale: measured again
TAU = 64.0  # steps over which a measurement's weight falls by e
PROBE_LIMIT = 64  # steps a probe of plain decoding may last without being measured
LATER = 2  # a mode measured slower than the other (by more than MARGIN) is measured again this many times less often


class Mode(enum.Enum):
    SPEC = "spec"
    PLAIN = "plain"


# measured steps before a mode's rate is trusted: plain decoding's tokens per step are fixed (its requests over
# the stages), speculation's vary with every miss, so it needs more
MIN_STEPS = {Mode.SPEC: 64, Mode.PLAIN: 8}


@dataclass
class _Rate:
    """Decayed sums of one mode's measured steps at one load."""

    min_steps: int
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0  # measured since it was last stale
    last: int = -(1 << 30)  # the step it was last measured at

    def add(self, step: int, tokens: int, seconds: float) -> None:
        if step - self.last >= FRESH:  # stale: start again
            self.tokens, self.seconds, self.steps = 0.0, 0.0, 0
        decay = math.exp(-max(step - self.last, 0) / TAU)
        self.tokens, self.seconds = self.tokens * decay + tokens, self.seconds * decay + seconds
        self.steps, self.last = self.steps + 1, step

    def known(self, step: int) -> bool:
        return self.steps >= self.min_steps and step - self.last < FRESH

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ModeCheck:
    """Measured tokens per second of each mode by load; chooses between the plan's speculation and plain decoding."""

    rates: dict[tuple[Mode, int], _Rate] = field(default_factory=dict)
    probe_from: int = -(1 << 30)  # the step the last probe of plain decoding began

    @staticmethod
    def load(decoding: int) -> int:
        """The load bucket of `decoding` requests: 1, 2, 3-4, 5-8, ... (the step costs' power-of-two buckets)."""
        return StepCosts.bucket(decoding)

    def observe(self, mode: Mode, decoding: int, step: int, tokens: int, seconds: float) -> None:
        """One step of `mode` alone in the pipe and in the verifications it awaits (no transition), no prompt
        rows in it: its verification's tokens and its seconds."""
        if decoding and seconds > 0:
            self.rates.setdefault((mode, self.load(decoding)), _Rate(MIN_STEPS[mode])).add(step, tokens, seconds)

    def new_lone_request(self) -> None:
        """One request decodes alone, not the one measured alone before: speculation's rate at this load was that
        request's acceptance, which says little about this one's (a summary copies its prompt, a story does
        not), so it is measured afresh. Plain decoding's rate, which does not depend on what a request writes,
        is kept. At higher loads a rate pools many requests and carries across them."""
        self.rates.pop((Mode.SPEC, self.load(1)), None)

    def choose(self, decoding: int, step: int) -> Mode:
        """The mode for a plan that would speculate: plain decoding where it measured more than MARGIN faster lately
        at this load, else the plan's speculation; where one is not known, speculation is measured first, then
        plain decoding probed."""
        spec, plain = (self.rates.get((m, self.load(decoding)), _Rate(MIN_STEPS[m])) for m in Mode)
        if spec.known(step) and plain.known(step):
            return Mode.PLAIN if plain.rate > (1 + MARGIN) * spec.rate else Mode.SPEC
        if not spec.known(step):
            return Mode.PLAIN if _lost(spec, plain, step) else Mode.SPEC
        if _lost(plain, spec, step):
            return Mode.SPEC
        if step - self.probe_from >= FRESH:  # a probe is due
            self.probe_from = step
        return Mode.PLAIN if step - self.probe_from < PROBE_LIMIT else Mode.SPEC

    def snapshot(self) -> dict[str, float]:
        """Each measured mode's rate by load (tests, diagnostics): "spec@1" -> tokens per second."""
        return {f"{m.value}@{1 << b}": r.rate for (m, b), r in sorted(self.rates.items(), key=lambda kv: kv[0][1])}


def _lost(loser: _Rate, winner: _Rate, step: int) -> bool:
    """Whether `loser` (not known now) was last measured slower than `winner` by more than MARGIN, within
    LATER x FRESH steps: it is measured again LATER times less often."""
    slower = loser.rate * (1 + MARGIN) < winner.rate
    return loser.steps >= loser.min_steps and slower and step - loser.last < LATER * FRESH
