"""Stage-to-stage transfer time of n rows, measured with the stage workers' own ActivationLink.

Two processes (ranks 0 and 1, the link's TCP on CPU / NCCL on CUDA, loopback; a
bare cuda puts rank k on GPU k, so NCCL needs two GPUs): rank 0 sends a
micro-batch of n rows (header, then one payload of metadata + [n, hidden]
states), rank 1 receives it and answers with a small ack (over the NCCL group,
or a control-path frame on the CPU). One-way time(n) =
round trip(n) - round trip(0) / 2 (the ack leg is the empty round trip's half).

    python -m benchmarks.transfer --hidden 1536   # prints the table as JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.costmodel import Table1D
from shared.compute.device import resolve_device
from shared.transport.control import ControlConfig, Inbox, Outbox
from shared.types.batch import MicroBatch, Row
from specpipe.cluster import free_port
from stage_worker.link import ActivationLink, LinkConfig, host_store, join_store


def _batch(n: int, hidden: int, dtype: torch.dtype) -> MicroBatch:
    rows = [Row("r", i, -1, 100 + i, 1, False, True) for i in range(n)]
    return MicroBatch(0, rows, torch.randn(n, hidden, dtype=dtype))


def _rank(rank: int, port: int, hidden: int, rows: list[int], repeats: int, device: str, dtype: str) -> None:
    dev = resolve_device(device, rank)  # a bare cuda: rank k on GPU k
    cfg = LinkConfig(rank, 2, master_port=port)
    store = host_store(cfg) if rank == 0 else join_store(cfg, cfg.master_addr, port)
    link = ActivationLink(cfg, dev, getattr(torch, dtype), hidden, store)
    send_ack, recv_ack = _acks(rank, link.backend, dev, store)
    result = {}
    for n in [0, *rows]:
        batch = _batch(n, hidden, getattr(torch, dtype))
        times = []
        for step in range(1, repeats + 2):
            if rank == 0:
                t0 = time.perf_counter()
                link.send(step, batch, {"r": 0})
                recv_ack()
                times.append(time.perf_counter() - t0)
            else:
                link.recv(step + 1, {0: "r"})
                send_ack()
        result[n] = sorted(times[1:])[len(times[1:]) // 2] if rank == 0 else 0.0
    link.close()
    if rank == 0:
        empty = result.pop(0)
        print(json.dumps({"rows": rows, "seconds": [max(result[n] - empty / 2, 0.0) for n in rows]}))


def _acks(rank: int, backend: str, dev: torch.device, store) -> tuple:
    """(send_ack, recv_ack) from rank 1 back to rank 0: the NCCL group's own send/recv, or on the CPU a frame to
    an inbox rank 0 listens on."""
    if backend == "nccl":
        ack = torch.zeros(1, device=dev)
        return (lambda: dist.send(ack, 0)), (lambda: dist.recv(ack, 1))
    if rank == 0:
        inbox = Inbox(ControlConfig())
        store.set("ack", inbox.address)
        return None, (lambda: inbox.recv_raw(None))
    outbox = Outbox([store.get("ack").decode()])
    return (lambda: outbox.send_raw(b"a")), None


def measure_transfer(hidden: int, rows: tuple[int, ...], repeats: int = 20, device: str = "cpu",
                     port: int | None = None, dtype: str = "float32") -> Table1D:
    """Run the two ranks as subprocesses and read rank 0's table."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "benchmarks.transfer", "--hidden", str(hidden), "--port", str(port),
           "--repeats", str(repeats), "--device", device, "--dtype", dtype, "--rows", *map(str, rows)]
    peer = subprocess.Popen([*cmd, "--rank", "1"], stdout=subprocess.DEVNULL)
    try:
        out = subprocess.run([*cmd, "--rank", "0"], capture_output=True, text=True, timeout=600, check=True)
    finally:
        peer.wait(timeout=60)
    return Table1D(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--rank", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu, cuda (rank k on GPU k) or cuda:N")
    p.add_argument("--dtype", default="float32", help="the states' dtype (they cross as bytes)")
    a = p.parse_args(argv)
    if a.rank is None:
        print(json.dumps(measure_transfer(a.hidden, tuple(a.rows), a.repeats, a.device, a.port, a.dtype).__dict__))
    else:
        _rank(a.rank, a.port, a.hidden, a.rows, a.repeats, a.device, a.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
