"""`--layer-split measured` in the launcher (specpipe.cluster.resolve_layer_split): the split is timed once, every
stage gets the same counts, and a measurement that cannot run leaves the balanced split."""

from __future__ import annotations

import pytest

from shared.types.config import ModelArch
from specpipe.cluster import ClusterConfig, commands, resolve_layer_split

pytestmark = pytest.mark.unit


def test_every_stage_gets_the_launchers_counts(tiny_dir) -> None:
    cfg = resolve_layer_split(ClusterConfig(model=str(tiny_dir), layer_split="measured", device="cpu"))
    counts = [int(n) for n in cfg.layer_split.split(",")]
    assert sum(counts) == ModelArch.from_model_dir(tiny_dir).num_layers and len(counts) == 2
    stages = [cmd for name, cmd in commands(cfg).items() if name.startswith("stage")]
    assert [cmd[cmd.index("--layer-split") + 1] for cmd in stages] == [cfg.layer_split] * 2


# label: (layer_split asked, model, what the stages get)
RESOLVED = {
    "a rule passes through": ("even", "tiny-random", "even"),
    "counts pass through": ("5,3", "tiny-random", "5,3"),
    "a failed measurement: balanced": ("measured", "no-such-model", "balanced"),
}


@pytest.mark.parametrize("case", list(RESOLVED))
def test_resolve_layer_split(case) -> None:
    split, model, expected = RESOLVED[case]
    assert resolve_layer_split(ClusterConfig(model=model, layer_split=split)).layer_split == expected
