"""The link's payload on a GPU (pytest -m cuda; deselected where there is none: benchmarks/gpu_check.sh runs it).

A link over NCCL needs two GPUs (one rank each); on one GPU these check the rest of the path: meta from the
host and states on the GPU packed into one uint8 payload there, viewed back on the GPU bit for bit, and a
one-stage NCCL group's send and receive (through a loopback) moving only GPU tensors, the states arriving on
the GPU.
"""

from __future__ import annotations

import pytest
import torch

from stage_worker.link import pack, payload_size, unpack
from tests.stage_worker.payloads import HIDDEN, SLOTS, batch_of, loopback_link, random_bits, same_bits

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def gpu() -> torch.device:
    assert torch.cuda.is_available(), "a cuda test needs an NVIDIA GPU: deselect it with -m 'not cuda'"
    return torch.device("cuda", 0)


# label: (dtype, rows, states transposed as a matmul may leave them)
PAYLOADS = {
    "bfloat16": (torch.bfloat16, 64, False),
    "float16": (torch.float16, 7, False),
    "float32": (torch.float32, 3, False),
    "bfloat16, not contiguous": (torch.bfloat16, 5, True),
}


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_payload_packed_and_viewed_back_on_the_gpu(case, gpu) -> None:
    dtype, rows, transposed = PAYLOADS[case]
    meta = torch.arange(rows * 6, dtype=torch.int64).view(rows, 6) * -(2 ** 40)  # on the host, as the link has it
    states = random_bits(rows, HIDDEN, dtype, device=str(gpu))
    if transposed:
        states = states.t().contiguous().t()
        assert not states.is_contiguous()
    payload = pack(meta, states)
    assert payload.device == gpu and payload.numel() == payload_size(rows, HIDDEN, dtype)
    got_meta, got_states = unpack(payload, rows, HIDDEN, dtype)
    assert got_states.device == gpu and got_states.data_ptr() == payload.data_ptr() + rows * 6 * 8
    assert torch.equal(got_meta.cpu(), meta) and same_bits(got_states, states)


# label: (dtype, rows)
MESSAGES = {"bfloat16": (torch.bfloat16, 33), "float16": (torch.float16, 2), "an empty batch": (torch.bfloat16, 0)}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_a_message_moves_only_gpu_tensors(case, gpu, monkeypatch) -> None:
    dtype, rows = MESSAGES[case]
    link, wire = loopback_link(monkeypatch, str(gpu), dtype)
    try:
        assert link.backend == "nccl"
        sent = batch_of(rows, dtype)
        sent.hidden = sent.hidden.to(gpu)  # a stage's output, where it computed
        link.send(1, sent, SLOTS)
        assert [(t.dtype, t.device) for t in wire.sent] == [(torch.int64, gpu)] + [(torch.uint8, gpu)] * (rows > 0)
        got = link.recv(2, {slot: rid for rid, slot in SLOTS.items()})
    finally:
        link.close()
    assert (got.batch_id, got.rows) == (sent.batch_id, sent.rows)
    assert got.hidden.device == gpu and same_bits(got.hidden, sent.hidden)
