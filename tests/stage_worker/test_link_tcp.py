"""Two real processes, one CPU link (plain TCP): micro-batches of float32, bfloat16 and float16 states (and an empty
one) arrive with every row and every bit as sent, through links re-formed per run; stages of different dtypes
refuse to form one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from shared.types.errors import ConfigError
from specpipe.cluster import free_port
from stage_worker.link import ActivationLink, LinkConfig, host_store, join_store
from tests.stage_worker.payloads import HIDDEN, SLOTS, batch_of, same_bits

pytestmark = pytest.mark.multiproc

# label: (dtype, rows)
TRANSFERS = {
    "float32": ("float32", 4),
    "bfloat16": ("bfloat16", 6),
    "float16": ("float16", 3),
    "an empty batch": ("bfloat16", 0),
}
MISMATCH = ("bfloat16", "float32")  # stage 0's dtype, stage 1's


def _stage(rank: int, port: int, runs: list[tuple[str, str, int]], out: str) -> None:
    """One end of a two-stage link on the CPU, re-formed per run (as a pipeline re-forms): in each run rank 0
    sends batch_of(rows) at step 1 and rank 1 receives it. Saves what it saw in each run, or the error that
    stopped the run, to out/rank{rank}.pt."""
    cfg = LinkConfig(rank, 2, master_port=port, timeout_s=60, rendezvous_s=60)
    store = host_store(cfg) if rank == 0 else join_store(cfg, cfg.master_addr, port)
    results = []
    for i, run in enumerate(runs):
        dtype, rows = getattr(torch, run[rank]), run[2]
        try:
            link = ActivationLink(cfg, torch.device("cpu"), dtype, HIDDEN, store, tag=f"run{i}")
        except ConfigError as exc:
            results.append({"error": str(exc)})
            continue
        if rank == 0:
            link.send(1, batch_of(rows, dtype), SLOTS)
            results.append({})
        else:
            got = link.recv(2, {slot: rid for rid, slot in SLOTS.items()})
            results.append({"batch_id": got.batch_id, "rows": [r._asdict() for r in got.rows], "hidden": got.hidden})
        link.close()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case of TRANSFERS, then the mismatch, through one pair of processes: label -> [rank 0's, rank 1's]."""
    out = tmp_path_factory.mktemp("link")
    cases = {label: (name, name, rows) for label, (name, rows) in TRANSFERS.items()} | {"mismatch": (*MISMATCH, 2)}
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_stage, args=(rank, port, list(cases.values()), str(out))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    saved = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return {label: [saved[0][i], saved[1][i]] for i, label in enumerate(cases)}


@pytest.mark.parametrize("case", list(TRANSFERS))
def test_a_micro_batch_crosses_two_processes_bit_for_bit(case, runs) -> None:
    name, rows = TRANSFERS[case]
    _, got = runs[case]
    sent = batch_of(rows, getattr(torch, name))
    assert got["batch_id"] == sent.batch_id
    assert got["rows"] == [r._asdict() for r in sent.rows]
    assert same_bits(got["hidden"], sent.hidden.reshape(rows, HIDDEN))


def test_stages_of_different_dtypes_refuse_to_form_a_link(runs) -> None:
    """The states cross as bytes: a bfloat16 stage feeding a float32 one would read garbage, so neither starts."""
    errors = [r.get("error", "") for r in runs["mismatch"]]
    assert all("--dtype" in e for e in errors), errors
