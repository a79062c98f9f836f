"""The measured layer split (shared/compute/split_measure.py): the LM head timed in layers' worth, counts that cut
the whole model, and stages on a GPU left to the weights-balanced split."""

from __future__ import annotations

import json

import pytest
import torch

from shared.compute.split_measure import head_layers, main
from shared.types.config import ModelArch, split_layers, stage_bounds

pytestmark = pytest.mark.unit


def test_the_head_is_timed_in_layers_worth(tiny_dir) -> None:
    arch = ModelArch.from_model_dir(tiny_dir)
    measured = head_layers(tiny_dir, arch, 2, "fast", torch.float32)
    assert measured["layer_ms"] > 0 and measured["head_ms"] >= 0
    assert measured["head_layers"] == pytest.approx(measured["head_ms"] / measured["layer_ms"])
    assert measured["weights_head_layers"] == arch.head_params / arch.layer_params


def test_main_prints_counts_that_cut_the_whole_model(tiny_dir, capsys) -> None:
    threads = str(torch.get_num_threads())  # main sets it: this process's stays as it was
    assert main(["--model", str(tiny_dir), "--stages", "2", "--numerics", "compiled", "--threads", threads]) == 0
    out = json.loads(capsys.readouterr().out)
    arch = ModelArch.from_model_dir(tiny_dir)
    assert out["counts"] == [b - a for a, b in split_layers(arch.num_layers, 2, out["head_layers"])]
    assert sum(out["counts"]) == arch.num_layers and min(out["counts"]) >= 1


def test_stages_on_a_gpu_keep_the_weights_balanced_split(tiny_dir, capsys) -> None:
    assert main(["--model", str(tiny_dir), "--stages", "2", "--device", "cuda"]) == 0
    out = json.loads(capsys.readouterr().out)
    balanced = stage_bounds(ModelArch.from_model_dir(tiny_dir), 2, "balanced")
    assert out["counts"] == [b - a for a, b in balanced] and "GPU" in out["why"]
