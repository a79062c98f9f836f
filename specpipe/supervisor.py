"""Children of `specpipe up`, kept running: restart policy, back-off, and what a death means for the cluster.

A child that exits is restarted under the policy (`no`, `on-failure`: a
non-zero exit or a signal, `always`), after a back-off that doubles with each
recent restart. Its heartbeat key is deleted at once, so the scheduler sees a
lost stage now rather than when the heartbeat expires. A draft worker is
never essential: when it is not restarted, the cluster serves on with less
speculation. Any other child that stays down stops the cluster.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

RESTART_POLICIES = ("no", "on-failure", "always")



@dataclass(frozen=True)
class RestartPolicy:
    mode: str = "on-failure"  # RESTART_POLICIES
    backoff_s: float = 0.5  # first delay; doubles per restart within `window_s`
    max_backoff_s: float = 10.0
    max_restarts: int = 5  # within window_s; past it the child stays down
    window_s: float = 60.0

    def wants_restart(self, returncode: int) -> bool:
        return self.mode == "always" or (self.mode == "on-failure" and returncode != 0)

    def delay(self, recent: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(recent - 1, 0))


@dataclass
class Child:
    name: str
    command: list[str]
    essential: bool  # the cluster cannot serve without it
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    restarts: deque = field(default_factory=deque)  # monotonic times of recent restarts
    restart_at: float | None = None  # a restart is due then
    given_up: bool = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env)

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit status {rc}"


class Supervisor:
    """Start every child, then `poll()` often: it restarts what died and says whether the cluster still serves."""

    def __init__(self, children: Iterable[Child], policy: RestartPolicy, on_exit: Callable[[str], None]):
        self.children = {c.name: c for c in children}
        self.policy, self.on_exit = policy, on_exit  # on_exit(name): e.g. delete its heartbeat

    def start(self) -> None:
        for child in self.children.values():
            child.start()

    def poll(self) -> str | None:
        """One pass; returns why the cluster must stop, or None while it serves."""
        now = time.monotonic()
        for child in self.children.values():
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.start()
                continue
            if child.proc.poll() is None:
                continue
            reason = self._exited(child, now)
            if reason is not None:
                return reason
        return None

    def _exited(self, child: Child, now: float) -> str | None:
        self.on_exit(child.name)
        how = child.describe_exit()
        while child.restarts and now - child.restarts[0] > self.policy.window_s:
            child.restarts.popleft()
        if self.policy.wants_restart(child.proc.returncode) and len(child.restarts) < self.policy.max_restarts:
            child.restarts.append(now)
            delay = self.policy.delay(len(child.restarts))
            child.restart_at = now + delay
            _say(f"{child.name} exited ({how}); restarting it in {delay:.1f} s "
                 f"(restart {len(child.restarts)} in the last {self.policy.window_s:.0f} s)")
            return None
        child.given_up = True
        if not child.essential:
            _say(f"{child.name} exited ({how}) and stays down; serving on without it (less speculation)")
            return None
        return f"{child.name} exited ({how}) and is not restarted (--restart {self.policy.mode})"

    def processes(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.children.values() if c.proc is not None]


def _say(text: str) -> None:
    print(f"specpipe up: {text}", file=sys.stderr, flush=True)
