"""The per-beat path, process to process over TCP: StepMsg out to the stages, VerifyMsg and ProposalsMsg back,
and the CPU stages' activations.

Redis is the durable queue (requests, outputs, draft jobs, cancellations, monitoring); a millisecond step
cannot afford its round trips, so the messages of every beat go straight to the process that needs them:

    scheduler --> stage k's inbox          StepMsg, one copy per stage (stage 0 takes its rows from it)
    last stage --> scheduler's inbox       VerifyMsg
    draft worker --> scheduler's inbox     ProposalsMsg
    stage k --> stage k+1's link inbox     activations on the CPU (stage_worker/link.py; NCCL on GPUs)

Every receiving process listens on one TCP socket, its inbox, on its control host (loopback by default; the
address its peers reach it at on a multi-host pipeline) and a port the OS picks; the addresses are found
through Redis (shared/transport/membership.py): the scheduler's in the run record, each stage's under
`control:{stage}`. Senders connect once per run and keep the connection.

A frame on the socket is a 4-byte big-endian length and that many bytes; a control message's bytes are the
same msgpack as on a Redis stream (shared/wire), so a malformed one is dropped and logged by the reader, never
raised. Receiving happens in the caller's thread, with no I/O thread in between: the receiver, blocked in
select(), wakes on the bytes themselves. A send writes what the socket takes at once, in the caller's
thread, and never waits: what does not fit (a prefill's activations while the next stage still computes) is
written by a per-connection thread, in order, while the caller goes on. (ZeroMQ, measured first on this 2-core CPU: a
ping-pong between two processes took 100 us against 22 us on a plain socket, and its I/O threads doubled
the wake-ups of a 4-stage beat.) A peer that is gone is found by its heartbeat (Redis), not here: a send to
a closed connection drops the connection and says so.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from shared.types.errors import ProtocolError
from shared.wire.messages import Message, decode

log = logging.getLogger(__name__)
LENGTH = struct.Struct(">I")  # a frame's length prefix
MAX_FRAME = 1 << 31  # bytes: a longer length prefix is a broken peer, not a frame
SEND_TIMEOUT_S = 5.0  # a peer that takes no bytes for this long is dropped (its heartbeat will say why)


@dataclass(frozen=True)
class ControlConfig:
    host: str = "127.0.0.1"  # this process's inbox address, as its peers reach it (loopback unless told)
    port: int = 0  # 0: a free one (the address travels through Redis)


class _Reader:
    """Bytes of one connection in, whole frames out."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytearray]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(self.buffer)
            if n > MAX_FRAME:
                raise ProtocolError(f"a frame of {n} bytes")
            if len(self.buffer) < LENGTH.size + n:
                break
            frames.append(self.buffer[LENGTH.size:LENGTH.size + n])
            del self.buffer[:LENGTH.size + n]
        return frames


class Inbox:
    """A listening socket and every connection to it: the frames sent to this process, in order per sender."""

    def __init__(self, cfg: ControlConfig):
        self.listener = socket.create_server((cfg.host, cfg.port))
        self.listener.setblocking(False)
        host, port = self.listener.getsockname()[:2]
        self.address = f"tcp://{host}:{port}"
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)

    def recv_raw(self, timeout_ms: int | None) -> list[bytearray]:
        """Whole frames, after waiting up to `timeout_ms` (None: forever, 0: not at all) for the first."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        frames: list[bytearray] = []
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in self.selector.select(left):
                if key.data is None:
                    self._accept()
                else:
                    frames += self._read(key.fileobj, key.data)
            if frames or (left is not None and left <= 0):
                return frames

    def recv(self, timeout_ms: int | None) -> list[Message]:
        """Decoded messages (recv_raw's frames); a malformed one is logged and dropped."""
        messages = []
        for raw in self.recv_raw(timeout_ms):
            try:
                messages.append(decode(bytes(raw)))
            except ProtocolError as exc:
                log.warning("control inbox %s: dropped malformed message: %s", self.address, exc)
        return messages

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, _Reader())

    def _read(self, conn: socket.socket, reader: _Reader) -> list[bytearray]:
        try:
            data = conn.recv(1 << 20)
            if data:
                return reader.feed(data)
        except BlockingIOError:
            return []
        except (OSError, ProtocolError) as exc:
            log.warning("control inbox %s: a sender broke off (%s)", self.address, exc)
        self.selector.unregister(conn)  # closed by the peer, or broken
        conn.close()
        return []

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


class Connection:
    """One sender's connection to an inbox. `send` never waits: it writes what the socket takes now, and a
    thread of this connection writes the rest, in order, blocking as long as the peer needs (at most
    SEND_TIMEOUT_S without taking a byte: then the connection is broken)."""

    def __init__(self, address: str):
        self.address = address
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=SEND_TIMEOUT_S)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT_S), 0))
        self.lock = threading.Condition()
        self.backlog: deque[list[memoryview]] = deque()  # frames (or their rest) for the thread to write
        self.writing = False  # the thread holds a frame: nothing may be written before it is out
        self.broken: OSError | None = None
        self.thread: threading.Thread | None = None

    def send(self, parts: list) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        with self.lock:
            if self.broken is not None:
                raise self.broken
            if not self.backlog and not self.writing:
                views = _write(self.sock, views, socket.MSG_DONTWAIT)
                if not views:
                    return
            self.backlog.append(views)
            if self.thread is None:
                self.thread = threading.Thread(target=self._drain, name=f"send-{self.address}", daemon=True)
                self.thread.start()
            self.lock.notify()

    def _drain(self) -> None:
        while True:
            with self.lock:
                while not self.backlog and self.broken is None:
                    self.lock.wait()
                if self.broken is not None:  # closed
                    return
                views, self.writing = self.backlog.popleft(), True
            try:
                _write(self.sock, views, 0)
            except OSError as exc:
                with self.lock:
                    self.broken, self.writing = exc, False
                    self.backlog.clear()
                return
            with self.lock:
                self.writing = False

    def close(self) -> None:
        with self.lock:
            self.broken = self.broken or ConnectionAbortedError("closed")
            self.backlog.clear()
            self.lock.notify()
        self.sock.close()


def _write(s: socket.socket, views: list[memoryview], flags: int) -> list[memoryview]:
    """sendmsg until every byte is out, or (MSG_DONTWAIT) until the socket takes no more: the rest."""
    while views:
        try:
            sent = s.sendmsg(views, [], flags)
        except BlockingIOError:
            return views
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
    return views


class Outbox:
    """Connections to a set of inboxes; `send` puts one message in every one of them, without waiting."""

    def __init__(self, addresses: Iterable[str] = ()):
        self.addresses: list[str] = []
        self.connections: list[Connection | None] = []
        self.connect(list(addresses))

    def connect(self, addresses: list[str]) -> None:
        """Point at these inboxes (a new run's); the connections to the old ones close. The same inboxes keep
        their connections, unless one broke (a peer restarted on a fixed port): then all are made again."""
        if addresses == self.addresses and self.connected:
            return
        self.close()
        self.addresses = list(addresses)
        self.connections = [_connect(a) for a in self.addresses]

    @property
    def connected(self) -> bool:
        """Every inbox is reachable (a broken connection stays broken until the next connect)."""
        return all(c is not None and c.broken is None for c in self.connections)

    def send(self, msg: Message) -> None:
        self.send_raw(msg.encode())

    def send_all(self, messages: list[Message]) -> None:
        """Several messages, one frame each, in one write per inbox (a write is a syscall and a wake-up)."""
        frames = [msg.encode() for msg in messages]  # joined: one iovec (sendmsg takes at most IOV_MAX of them)
        self._send([b"".join(part for frame in frames for part in (LENGTH.pack(len(frame)), frame))] if frames else [])

    def send_raw(self, *parts: bytes | memoryview) -> None:
        """One frame of these parts, concatenated on the wire (not in memory), to every inbox."""
        self._send([LENGTH.pack(sum(memoryview(p).nbytes for p in parts)), *parts])

    def _send(self, parts: list[bytes | memoryview]) -> None:
        """These bytes (whole frames), in one write, to every inbox."""
        if not parts:
            return
        for i, c in enumerate(self.connections):
            if c is None:
                continue
            try:
                c.send(parts)
            except OSError as exc:
                log.warning("control: %s broke off (%s); its messages are dropped", self.addresses[i], exc)
                c.close()
                self.connections[i] = None

    def close(self) -> None:
        for c in self.connections:
            if c is not None:
                c.close()
        self.addresses, self.connections = [], []


def _connect(address: str) -> Connection | None:
    try:
        return Connection(address)
    except (OSError, ValueError) as exc:
        log.warning("control: cannot reach %s (%s); its messages are dropped", address, exc)
        return None
