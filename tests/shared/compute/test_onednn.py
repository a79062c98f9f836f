"""Fast numerics' CPU products (shared/compute/onednn.py): oneDNN's packed weights, and F.linear for the few-row
products where the host's MKL is the faster one, compute the same function as F.linear up to fp32 rounding at
every row count on either path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.compute.onednn import INTEL_MKL_ROWS, mkl_rows, onednn_linear
from shared.compute.runner import load_stage
from shared.types.config import ModelArch

pytestmark = pytest.mark.unit

# label: rows up to which F.linear computes (0: oneDNN for every product)
PATHS = {"oneDNN only": 0, "MKL up to 3 rows": 3}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("rows", [1, 3, 4, 5])
def test_every_row_count_computes_the_product(tiny_dir, path, rows) -> None:
    weights = load_stage(tiny_dir, ModelArch.from_model_dir(tiny_dir), 0, 1).weights
    lin = onednn_linear(weights, small=PATHS[path])
    if lin is None:
        pytest.fail("oneDNN cannot pack fp32 on this CPU: fast numerics would fall back to F.linear")
    layer = weights.layers[0]
    torch.manual_seed(rows)
    for w, b in [(layer.qkv, layer.qkv_bias), (layer.down, None)]:
        x = torch.randn(rows, w.shape[1])
        torch.testing.assert_close(lin(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_the_rule_is_the_cpus_make() -> None:
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    assert mkl_rows() == (INTEL_MKL_ROWS if intel and torch.backends.mkl.is_available() else 0)
