"""The DistrAttention benchmarks' own logic: settings parsed into configs, the speed table's parts, the GPU table."""

from __future__ import annotations

import pytest

from benchmarks import distr_forms, distr_gpu, distr_speed
from benchmarks.distr_accuracy import parse_setting
from shared.types.config import AttentionConfig
from shared.types.errors import ConfigError

SETTINGS = {
    "exact": ("exact", AttentionConfig()),
    "group size only": ("G=2", AttentionConfig("distr", group_size=2)),
    "every knob": ("G=4,fuse=sum_one,layout=adjacent,bucket=binary,block_rows=64",
                   AttentionConfig("distr", group_size=4, fuse="sum_one", layout="adjacent", bucket="binary",
                                   block_rows=64)),
    "layer list goes on": ("G=2,layers=0,3-5", AttentionConfig("distr", group_size=2, layers="0,3-5")),
    "layers from the end": ("G=2,layers=end-4-end-2,end-1",
                            AttentionConfig("distr", group_size=2, layers="end-4-end-2,end-1")),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(SETTINGS), ids=list(SETTINGS))
def test_setting_parses_into_its_config(case) -> None:
    text, cfg = SETTINGS[case]
    assert parse_setting(text) == cfg


BAD_SETTINGS = {"unknown field": "G=2,speed=9", "no value": "G=", "bad layout": "layout=zigzag"}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(BAD_SETTINGS), ids=list(BAD_SETTINGS))
def test_bad_setting_is_refused(case) -> None:
    with pytest.raises(ConfigError):
        parse_setting(BAD_SETTINGS[case])


@pytest.mark.unit
def test_speed_table_splits_distr_time_into_its_parts() -> None:
    """A small real measurement: every method timed, and the matmul share is what is left of distr's time."""
    row = distr_speed.measure(512, 32, 2, reps=1, math_max_len=512)
    assert set(row["ms"]) == {"sdpa", "sdpa_fused_qk", "sdpa_vsplit", "distr_g1", "distr_g2", "distr_g4",
                              "spread_sdpa_g2", "spread_sdpa_g4", "groups_g2", "fuse_g2", "spread_g2", "groups_g4",
                              "fuse_g4", "spread_g4"}
    args = type("Args", (), {"threads": 1, "reps": 1})()
    machine = {"cpu": "cpu", "cores": 2, "torch": "t", "load_avg_start": 0.0}
    table = distr_speed.markdown([row], args, machine, 0.0).splitlines()
    times = [c.strip() for c in table[4].strip("|").split("|")]
    ms = row["ms"]
    assert times[:3] == ["512", "2", "32"] and times[11:13] == ["—", "—"]  # flex not asked for
    assert times[13] == f"{row['x']['distr_g2']:.2f}x" and row['x']['sdpa'] == 1.0
    parts = [c.strip() for c in table[-1].strip("|").split("|")]
    assert parts[4] == f"{ms['distr_g2'] - ms['groups_g2'] - ms['fuse_g2']:.0f}"


@pytest.mark.unit
def test_gpu_table_names_what_the_budget_left_out() -> None:
    ms = {name: 2.0 for name in ["sdpa flash", *distr_gpu.VARIANTS]}
    text = distr_gpu.markdown([{"length": 4096, "d": 64, "heads": 16, "ms": ms}], {64: {"distr G=2 mean_sum": 1e-3}},
                              ["L=32768 d=128"], "GPU")
    assert "| 4096 | 16 | 64 | 2.00 | 2.00 (1.00x) |" in text and "Left out (budget spent): L=32768 d=128" in text


@pytest.mark.unit
def test_forms_table_has_a_first_chunk_and_a_prefix_row_per_model() -> None:
    rows = [distr_forms.measure(model, 256, chunk, reps=1) for chunk in (256, 128) for model in distr_forms.SHAPES]
    assert all(set(r["x"]) == {"sdpa", "spread_g2", "matmul_g2", "spread_g4", "matmul_g4"} for r in rows)
    args = type("Args", (), {"length": 256, "prefix_chunk": 128, "threads": 1, "reps": 1})()
    machine = {"cpu": "cpu", "cores": 2, "torch": "t", "load_avg_start": 0.0}
    table = distr_forms.markdown(rows, args, machine, 0.0).splitlines()
    assert [line.split("|")[2:4] for line in table[-4:]] == [[" 256 ", " 256 "]] * 2 + [[" 128 ", " 256 "]] * 2
