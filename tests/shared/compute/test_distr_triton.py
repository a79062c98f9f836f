"""The Triton DistrAttention kernel against the CPU reference, under Triton's interpreter (no GPU needed).

Triton chooses interpreter or GPU when it jits, at import, so the cases run in one child process started with
TRITON_INTERPRET=1 (tests/shared/compute/distr_triton_interpret.py); each test below checks its case's answer.
triton is a test dependency (pyproject's `test` extra, Linux), so CI runs these; where it is missing they skip
and say so. Tolerance: the kernel's online softmax over key tiles against the reference's single softmax,
both fp32, differ by rounding only: max |Δ| < 1e-5 of max |reference|; with fp16 inputs (the reference on the
same values upcast) the kernel rounds Q', K' and P to fp16 (11-bit mantissa): < 2e-3. bf16 runs on a GPU only
(tests/shared/compute/test_distr_triton_cuda.py): the interpreter cannot multiply bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it on Linux)")

ROOT = Path(__file__).resolve().parents[3]
TOL = {"float32": 1e-5, "float16": 2e-3}

FIELDS = ("n", "h", "g", "d", "q_offset", "causal", "G", "block_rows", "fuse", "layout", "block_keys", "dtype")
RANDOM = {  # label: n, h, g, d, q_offset, causal, G, block_rows, fuse, layout, block_keys, dtype
    "mha, G=2, mean_sum, strided": (200, 4, 4, 32, 0, True, 2, 64, "mean_sum", "strided", 32, "float32"),
    "gqa 3:1, chunk after a prefix, sum_one": (150, 6, 2, 32, 40, True, 2, 64, "sum_one", "strided", 32, "float32"),
    "G=4, d=64, adjacent, ragged blocks": (100, 2, 1, 64, 0, True, 4, 32, "mean_sum", "adjacent", 16, "float32"),
    "not causal": (96, 2, 2, 32, 0, False, 2, 32, "mean_sum", "strided", 32, "float32"),
    "authors' tiles: l=128, 64 keys, d=64": (256, 2, 1, 64, 0, True, 2, 128, "sum_one", "strided", 64, "float32"),
    "fp16 inputs, d=128, G=4": (256, 2, 1, 128, 0, True, 4, 128, "mean_sum", "strided", 64, "float16"),
    "G=1 is exact attention": (128, 2, 2, 32, 7, True, 1, 64, "mean_sum", "strided", 32, "float32"),
}
REAL = {  # label: layer of smollm2-135m (d = 64, 9 heads on 3 kv heads), prompt tokens, G, fuse, layout
    "smollm2 layer 3, G=2, mean_sum, strided": (3, 200, 2, "mean_sum", "strided"),
    "smollm2 layer 17, G=4, sum_one, adjacent": (17, 200, 4, "sum_one", "adjacent"),
}


def interpret(cases: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Run the cases in a child process under Triton's interpreter. -> label: {"reference": err[, "exact": err]}."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT),
           os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "-m", "tests.shared.compute.distr_triton_interpret"], check=False,
                          cwd=ROOT, env=env, input=json.dumps(cases), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def random_errors() -> dict[str, dict[str, float]]:
    return interpret({label: dict(zip(FIELDS, case)) for label, case in RANDOM.items()})


@pytest.fixture(scope="module")
def real_errors(smollm2_dir) -> dict[str, dict[str, float]]:
    cases = {label: {"model": "smollm2-135m", "layer": layer, "n": n, "G": G, "fuse": fuse, "layout": layout,
                     "block_rows": 64, "block_keys": 32} for label, (layer, n, G, fuse, layout) in REAL.items()}
    return interpret(cases)


@pytest.mark.unit
@pytest.mark.parametrize("case", list(RANDOM), ids=list(RANDOM))
def test_kernel_matches_reference_on_random_qkv(random_errors, case) -> None:
    errors, tol = random_errors[case], TOL[RANDOM[case][-1]]
    assert errors["reference"] < tol, errors
    assert errors.get("exact", 0.0) < tol, errors
    assert ("exact" in errors) == (RANDOM[case][6] == 1)  # G = 1 was also held against exact attention


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL), ids=list(REAL))
def test_kernel_matches_reference_on_real_qkv(real_errors, case) -> None:
    assert real_errors[case]["reference"] < TOL["float32"], real_errors[case]
