"""DistrAttention: exact at G = 1, error falling with G, the CPU path = the reference, and the runner's prefill path.

Tolerances: fp32 kernels against a float64 causal softmax(Q·Kᵀ/sqrt(d))·V on
values of order 1 agree to max |Δ| < 1e-5 (fp32 rounding over d <= 64 terms is
~1e-6); the CPU path against the untiled reference differs only in summation
order, also < 1e-5.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.compute.distr_attention import distr_attention, distr_attention_reference
from shared.compute.distr_groups import column_groups, fuse_keys, fuse_queries
from shared.compute.distr_sdpa import distr_attention_sdpa
from shared.compute.runner import RequestInfo, StageRunner, load_stage
from shared.compute.weights import load_stage_weights
from shared.model_store import load_tokenizer
from shared.types.batch import MicroBatch, Row
from shared.types.config import AttentionConfig, ModelArch, SamplingParams
from shared.types.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
TOL = 1e-5
KERNELS = {"tiled": distr_attention, "reference": distr_attention_reference, "spread-sdpa": distr_attention_sdpa}


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Causal softmax(Q·Kᵀ/sqrt(d))·V in float64. q: [n, h, d]; k, v: [L, g, d] -> [n, h, d]."""
    (n, _, d), r = q.shape, q.shape[1] // k.shape[1]
    keys = k.double().repeat_interleave(r, dim=1).transpose(0, 1)  # [h, L, d]
    values = v.double().repeat_interleave(r, dim=1).transpose(0, 1)  # [h, L, d]
    scores = q.double().transpose(0, 1) @ keys.transpose(-1, -2) / d**0.5  # [h, n, L]
    later = torch.arange(k.shape[0])[None, :] > torch.arange(q_offset, q_offset + n)[:, None]  # [n, L]
    scores = scores.masked_fill(later, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values).transpose(0, 1)  # [n, h, d]


def random_qkv(n: int, h: int, g: int, d: int, q_offset: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=gen)
    k, v = (torch.randn(q_offset + n, g, d, generator=gen) for _ in range(2))
    return q, k, v


def structured_qkv(n: int, h: int, g: int, d: int, seed: int = 0):
    """Q whose d columns come from d / 8 underlying directions plus 10% noise, as in real heads."""
    gen = torch.Generator().manual_seed(seed)
    bases = torch.randn(n, h, d // 8, generator=gen)  # [n, h, d/8]
    source = torch.randint(0, d // 8, (d,), generator=gen)  # column c copies base source[c]
    q = bases[..., source] * (1 + torch.rand(d, generator=gen)) + 0.1 * torch.randn(n, h, d, generator=gen)
    k, v = (torch.randn(n, g, d, generator=gen) for _ in range(2))
    return q, k, v


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# ---- the kernels -------------------------------------------------------------------------------

SHAPES = {  # n, h, g, d, q_offset, block_rows
    "mha": (96, 4, 4, 32, 0, 32),
    "gqa-3-to-1": (96, 6, 2, 32, 0, 32),
    "chunk-after-prefix": (80, 4, 2, 64, 45, 32),
    "last-block-short": (70, 4, 2, 16, 3, 32),
    "block-of-one-row": (9, 2, 1, 16, 5, 1),
}


@pytest.mark.unit
@pytest.mark.parametrize("kernel", list(KERNELS), ids=list(KERNELS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_group_size_one_is_exact(kernel, shape) -> None:
    n, h, g, d, q_offset, block_rows = shape
    q, k, v = random_qkv(n, h, g, d, q_offset)
    out = KERNELS[kernel](q, k, v, AttentionConfig("distr", group_size=1, block_rows=block_rows), q_offset=q_offset)
    assert (out.double() - exact_attention(q, k, v, q_offset)).abs().max().item() < TOL


@pytest.mark.unit
@pytest.mark.parametrize("data", [random_qkv, structured_qkv], ids=["random", "structured"])
def test_error_falls_as_group_size_falls(data) -> None:
    """Mean relative error over 3 seeds for G = 8, 4, 2, 1 is non-increasing, and ~0 at G = 1."""
    errors = []
    for group_size in (8, 4, 2, 1):
        cfg = AttentionConfig("distr", group_size=group_size, block_rows=32)
        runs = [data(128, 4, 2, 64, seed=seed) for seed in range(3)]
        errors.append(sum(relative_error(distr_attention(*qkv, cfg), exact_attention(*qkv)) for qkv in runs) / 3)
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < TOL and errors[0] > 10 * TOL, errors


def block_scores(q_block: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, fuse: str) -> torch.Tensor:
    """Q'·K'ᵀ of one block. q_block: [h, l, d]; keys: [h, L, d]; groups: [h, G, d/G] -> [h, l, L]."""
    k_fused = torch.stack([fuse_keys(keys[j], groups[j], fuse) for j in range(keys.shape[0])])  # [h, L, d/G]
    return fuse_queries(q_block, groups, fuse) @ k_fused.transpose(-1, -2)


@pytest.mark.unit
@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed-0", "seed-1", "seed-2"])
def test_hash_order_beats_original_order_on_structured_q(seed) -> None:
    """Grouping columns in SimHash order fuses similar columns: on structured Q the score error of G = 2
    (adjacent groups, mean_sum) is well below that of grouping neighbours in their original order."""
    q, k, _ = structured_qkv(32, 4, 4, 64, seed=seed)
    cfg = AttentionConfig("distr", block_rows=32, layout="adjacent")
    q_block, keys = q.transpose(0, 1), k.transpose(0, 1)  # [h, 32, d], [h, 32, d]
    identity = torch.arange(64).view(32, 2).T.expand(4, 2, 32)  # [h, G, d/G]: groups (0, 1), (2, 3), ...
    exact = q_block @ keys.transpose(-1, -2)
    hashed = block_scores(q_block, keys, column_groups(q, cfg)[0], "mean_sum")
    original = block_scores(q_block, keys, identity, "mean_sum")
    assert (hashed - exact).norm() < 0.6 * (original - exact).norm()


TILES = {  # sub_rows, q_offset, causal, group_size, block_rows, fuse, layout
    "sub-3": (3, 0, True, 2, 32, "mean_sum", "strided"),
    "sub-7-does-not-divide": (7, 11, True, 4, 32, "sum_one", "strided"),
    "sub-32-is-the-block": (32, 0, True, 2, 32, "mean_sum", "adjacent"),
    "sub-50-offset": (50, 30, True, 4, 64, "sum_one", "adjacent"),
    "sub-longer-than-block": (1000, 30, True, 2, 32, "mean_sum", "strided"),
    "non-causal-sub-13": (13, 0, False, 4, 32, "mean_sum", "strided"),
}


@pytest.mark.unit
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
def test_cpu_path_equals_reference(tile) -> None:
    sub_rows, q_offset, causal, group_size, block_rows, fuse, layout = tile
    q, k, v = random_qkv(100, 6, 2, 32, q_offset, seed=sub_rows)
    cfg = AttentionConfig("distr", group_size=group_size, block_rows=block_rows, fuse=fuse, layout=layout)
    fast = distr_attention(q, k, v, cfg, causal=causal, q_offset=q_offset, sub_rows=sub_rows)
    reference = distr_attention_reference(q, k, v, cfg, causal=causal, q_offset=q_offset)
    assert (fast - reference).abs().max().item() < TOL


SPREAD_CASES = {  # n, h, g, d, q_offset, causal, group_size, block_rows, fuse, layout
    "mha first chunk (is_causal)": (100, 4, 4, 32, 0, True, 2, 32, "mean_sum", "strided"),
    "gqa first chunk (enable_gqa)": (100, 6, 2, 32, 0, True, 4, 32, "sum_one", "strided"),
    "chunk after a prefix (mask)": (80, 6, 2, 64, 45, True, 2, 32, "mean_sum", "adjacent"),
    "sum_one after a prefix": (70, 4, 2, 16, 3, True, 4, 32, "sum_one", "adjacent"),
    "non-causal": (64, 4, 2, 32, 0, False, 2, 16, "mean_sum", "strided"),
    "ragged last block": (300, 4, 4, 64, 0, True, 2, 128, "mean_sum", "strided"),
    "G=8": (96, 2, 1, 64, 0, True, 8, 32, "sum_one", "strided"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(SPREAD_CASES), ids=list(SPREAD_CASES))
def test_spread_sdpa_path_equals_reference(case) -> None:
    """Q̃·Kᵀ = Q'·K'ᵀ: SDPA on the spread queries is DistrAttention, within fp32 rounding of the reference."""
    n, h, g, d, q_offset, causal, group_size, block_rows, fuse, layout = SPREAD_CASES[case]
    q, k, v = random_qkv(n, h, g, d, q_offset, seed=n)
    cfg = AttentionConfig("distr", group_size=group_size, block_rows=block_rows, fuse=fuse, layout=layout)
    spread = distr_attention_sdpa(q, k, v, cfg, causal=causal, q_offset=q_offset)
    reference = distr_attention_reference(q, k, v, cfg, causal=causal, q_offset=q_offset)
    assert (spread - reference).abs().max().item() < TOL


# ---- fused columns: when each representative is exact -------------------------------------------


def equal_within_groups(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x with every column of a group replaced by the group's first column. x: [L, d]; groups: [G, d/G]."""
    out = x.clone()
    for slot in groups[1:]:
        out[:, slot] = x[:, groups[0]]
    return out


FUSES_EXACT_WHEN = {  # fuse, the tensor whose columns are equal within each group, exact?
    "mean_sum, equal K columns": ("mean_sum", "k", True),
    "sum_one, equal K columns": ("sum_one", "k", True),
    "mean_sum, equal Q columns": ("mean_sum", "q", True),
    "sum_one, equal Q columns": ("sum_one", "q", False),
}


@pytest.mark.unit
@pytest.mark.parametrize("layout", ["strided", "adjacent"])
@pytest.mark.parametrize("case", list(FUSES_EXACT_WHEN), ids=list(FUSES_EXACT_WHEN))
def test_fused_scores_are_exact_when_group_columns_are_equal(case, layout) -> None:
    """Per pair (a, b): sum_one errs by q_a·(k_a − k_b), mean_sum by (q_a − q_b)·(k_a − k_b)/2
    (docs/distrattention.md, section 3), so equal K columns make both exact, equal Q columns only mean_sum."""
    fuse, equal, exact = FUSES_EXACT_WHEN[case]
    q, k, _ = random_qkv(32, 1, 1, 16, seed=4)
    q_block, keys = q[:, 0].double(), k[:, 0].double()  # [32, 16] each
    groups = column_groups(q, AttentionConfig("distr", group_size=4, block_rows=32, layout=layout))[0, 0]  # [4, 4]
    if equal == "k":
        keys = equal_within_groups(keys, groups)
    else:
        q_block = equal_within_groups(q_block, groups)
    fused = block_scores(q_block[None], keys[None], groups[None], fuse)[0]
    error = (fused - q_block @ keys.T).abs().max().item()
    assert (error < 1e-9) == exact, error


# ---- masking and GQA ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kernel", list(KERNELS), ids=list(KERNELS))
def test_causal_rows_ignore_later_keys(kernel) -> None:
    """Query at position p sees keys 0..p only: changing keys/values after p leaves its row bit-identical."""
    q, k, v = random_qkv(64, 4, 2, 32, q_offset=16, seed=6)
    cfg = AttentionConfig("distr", group_size=2, block_rows=16)
    later_k, later_v = k.clone(), v.clone()
    later_k[50:], later_v[50:] = 1e3, -1e3  # positions 50.. are seen by query rows 34..
    base, changed = (KERNELS[kernel](q, kk, vv, cfg, q_offset=16) for kk, vv in ((k, v), (later_k, later_v)))
    assert torch.equal(base[:34], changed[:34])
    assert not torch.allclose(base[34:], changed[34:])
    full = KERNELS[kernel](q, k, v, cfg, causal=False)
    assert not torch.allclose(full, base)


@pytest.mark.unit
@pytest.mark.parametrize("kernel", list(KERNELS), ids=list(KERNELS))
def test_gqa_equals_repeated_kv_heads(kernel) -> None:
    """Query head j uses kv head j // r: GQA gives what MHA gives on each kv head repeated r times."""
    q, k, v = random_qkv(64, 6, 2, 32, seed=7)
    cfg = AttentionConfig("distr", group_size=4, block_rows=32)
    grouped = KERNELS[kernel](q, k, v, cfg)
    repeated = KERNELS[kernel](q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), cfg)
    assert (grouped - repeated).abs().max().item() < 1e-6


@pytest.mark.unit
def test_bad_shapes_are_refused() -> None:
    q, k, v = random_qkv(16, 4, 2, 32)
    with pytest.raises(ValueError, match="only 16 keys"):
        distr_attention(q, k, v, AttentionConfig("distr"), q_offset=1)
    with pytest.raises(ConfigError, match="does not divide the head dim 32"):
        distr_attention(q, k, v, AttentionConfig("distr", group_size=3))
    with pytest.raises(ValueError, match="sub_rows must be >= 1"):
        distr_attention(q, k, v, AttentionConfig("distr"), sub_rows=0)


# ---- configuration -----------------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown-kind": ({"kind": "sparse"}, "unknown attention 'sparse'"),
    "group-size-zero": ({"group_size": 0}, "group_size must be >= 1"),
    "block-rows-zero": ({"block_rows": 0}, "block_rows must be >= 1"),
    "hash-bits-zero": ({"hash_bits": 0}, "hash_bits must be in 1..62"),
    "hash-bits-63": ({"hash_bits": 63}, "hash_bits must be in 1..62"),
    "unknown-layout": ({"layout": "zigzag"}, "unknown attention layout 'zigzag'"),
    "unknown-fuse": ({"fuse": "max"}, "unknown attention fuse 'max'"),
    "unknown-bucket": ({"bucket": "morton"}, "unknown attention bucket 'morton'"),
    "layers-not-numbers": ({"layers": "first"}, "attention layers 'first'"),
    "layers-range-backwards": ({"layers": "5-3"}, "attention layers '5-3'"),
    "layers-empty-item": ({"layers": "1,,2"}, "attention layers '1,,2'"),
    "layers-end-0": ({"layers": "end-0"}, "attention layers 'end-0'"),
    "layers-end-range-backwards": ({"layers": "end-1-end-3"}, "attention layers 'end-1-end-3'"),
    "layers-negative-index": ({"layers": "-2"}, "attention layers '-2'"),
    "layers-end-without-k": ({"layers": "end"}, "attention layers 'end'"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_bad_config_is_refused(case) -> None:
    fields, message = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=message):
        AttentionConfig(**fields)


LAYER_SPECS = {  # spec: the layers of a 12-layer model that use distr
    "all": ("all", list(range(12))),
    "one layer": ("3", [3]),
    "list and ranges": ("0,4-5,9", [0, 4, 5, 9]),
    "from 8 to the end": ("8-", [8, 9, 10, 11]),
    "spaces allowed": ("1, 2", [1, 2]),
    "last layer": ("end-1", [11]),
    "second to last (the default)": (AttentionConfig.layers, [10]),
    "the last three": ("end-3-", [9, 10, 11]),
    "from the end to the end": ("end-4-end-2", [8, 9, 10]),
    "index to from-end": ("7-end-3", [7, 8, 9]),
    "from-end to index": ("end-3-10", [9, 10]),
    "mixed list": ("0,end-1", [0, 11]),
    "overlaps once": ("9-,end-2", [9, 10, 11]),
    "first layer from the end": ("end-12", [0]),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(LAYER_SPECS), ids=list(LAYER_SPECS))
def test_layer_spec_picks_the_layers(case) -> None:
    spec, layers = LAYER_SPECS[case]
    assert sorted(AttentionConfig("distr", layers=spec).distr_layers(12)) == layers
    assert AttentionConfig("exact", layers=spec).distr_layers(12) == frozenset()


OUT_OF_MODEL = {  # spec that parses but names a layer a 12-layer model does not have
    "index past the last": "12",
    "open range past the last": "12-",
    "from the end past the first": "end-13",
    "range empty once resolved": "9-end-5",
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(OUT_OF_MODEL), ids=list(OUT_OF_MODEL))
def test_layer_spec_outside_the_model_is_refused(case) -> None:
    cfg = AttentionConfig("distr", layers=OUT_OF_MODEL[case])
    with pytest.raises(ConfigError, match="outside 0-11"):
        cfg.distr_layers(12)


STAGE_WORKER_ERRORS = {
    "group-size-does-not-divide": (["--group-size", "3"], "group_size 3 does not divide the head dim 16"),
    "block-rows-negative": (["--block-rows", "-1"], "block_rows must be >= 1"),
    "layers-unparsable": (["--distr-layers", "last"], "attention layers 'last'"),
    "layers-outside-the-model": (["--distr-layers", "end-9"], "attention layers 'end-9': names a layer outside 0-7"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(STAGE_WORKER_ERRORS), ids=list(STAGE_WORKER_ERRORS))
def test_stage_worker_flags_give_clear_errors(case) -> None:
    flags, message = STAGE_WORKER_ERRORS[case]
    proc = subprocess.run(
        [sys.executable, "-m", "stage_worker", "--rank", "0", "--world", "1", "--model", "tiny-random",
         "--redis-url", "redis://127.0.0.1:1/0", "--attention", "distr", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and message in proc.stderr, proc.stderr


# ---- the stage runner ----------------------------------------------------------------------------


def _runners(model_dir: Path, *attention: AttentionConfig) -> list[StageRunner]:
    """A default (exact) runner, then one per config, all on one copy of the weights (read only)."""
    arch = ModelArch.from_model_dir(model_dir)
    weights = load_stage_weights(model_dir, arch, 0, arch.num_layers)
    return [StageRunner(arch, weights)] + [StageRunner(arch, weights, cfg) for cfg in attention]


def _prefill_logits(runner: StageRunner, prompt: list[int], chunk: int) -> torch.Tensor:
    """Prefill in micro-batches of `chunk` committed rows; logits of every row [n, V]."""
    runner.add_request("r", RequestInfo(len(prompt), SamplingParams()), len(prompt) + 16)
    rows = [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(prompt)]
    hidden = [runner.hidden(MicroBatch(i, rows[i : i + chunk])) for i in range(0, len(rows), chunk)]
    return runner.logits(torch.cat(hidden))


TINY_PROMPT = torch.randint(3, 49000, (96,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [96, 40], ids=["one-chunk", "chunks-of-40"])
def test_runner_distr_g1_matches_exact(tiny_dir, chunk) -> None:
    exact, distr = (_prefill_logits(r, TINY_PROMPT, chunk)
                    for r in _runners(tiny_dir, AttentionConfig("distr", group_size=1, block_rows=16, layers="all")))
    assert (distr - exact).abs().max().item() < 1e-4
    assert torch.equal(distr.argmax(-1), exact.argmax(-1))


@pytest.mark.unit
def test_runner_distr_path_is_taken_for_long_chunks_only(tiny_dir) -> None:
    """G = 4 changes a long prefill chunk; a chunk shorter than block_rows stays bit-identical to exact."""
    cfg = AttentionConfig("distr", group_size=4, block_rows=16, layers="all")
    exact, approx = (_prefill_logits(r, TINY_PROMPT, 96) for r in _runners(tiny_dir, cfg))
    assert not torch.allclose(approx, exact, atol=1e-3)
    exact, short = (_prefill_logits(r, TINY_PROMPT, 15) for r in _runners(tiny_dir, cfg))
    assert torch.equal(short, exact)


@pytest.mark.unit
def test_runner_distr_chunk_same_beside_other_requests(tiny_dir) -> None:
    """A prefill chunk's rows interleaved with another request's in one micro-batch: the same numbers as alone."""
    cfg = AttentionConfig("distr", group_size=4, block_rows=16, layers="all")
    alone, mixed = _runners(tiny_dir, cfg, cfg)[1:]
    for runner, rids in ((alone, ["a"]), (mixed, ["a", "b"])):
        for rid in rids:
            runner.add_request(rid, RequestInfo(40, SamplingParams()), 64)
    rows = {rid: [Row(rid, -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(TINY_PROMPT[off : off + 40])]
            for rid, off in (("a", 0), ("b", 50))}
    interleaved = [row for pair in zip(rows["a"], rows["b"]) for row in pair]  # a0 b0 a1 b1 ...
    assert torch.equal(mixed.hidden(MicroBatch(0, interleaved))[0::2], alone.hidden(MicroBatch(0, rows["a"])))


@pytest.mark.unit
def test_runner_tree_rows_stay_exact(tiny_dir) -> None:
    """Speculative rows (a chain of 6 in-flight nodes, more than block_rows) never take the distr path."""
    prompt, chain = TINY_PROMPT[:10], TINY_PROMPT[10:16]
    outs = []
    for runner in _runners(tiny_dir, AttentionConfig("distr", group_size=4, block_rows=4, layers="all")):
        _prefill_logits(runner, prompt, 3)  # chunks shorter than block_rows: exact
        rows = [Row("r", i, i - 1, 10 + i, t, False, True) for i, t in enumerate(chain)]
        outs.append(runner.hidden(MicroBatch(99, rows)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.unit
@pytest.mark.parametrize("layers", ["5-", AttentionConfig.layers], ids=["5-", "default"])
@pytest.mark.parametrize("stage", [(0, 1), (0, 2), (1, 2)], ids=["whole-model", "stage-0-of-2", "stage-1-of-2"])
def test_runner_uses_distr_in_the_named_layers_only(tiny_dir, stage, layers) -> None:
    """layers counts the model's layers, not the stage's (end-k too: the default end-2 is layer 6 of 8 on the
    last stage): on a stage that holds none of them the prefill is bit-identical to exact; on one that holds some
    it is not."""
    rank, world = stage
    arch = ModelArch.from_model_dir(tiny_dir)
    cfg = AttentionConfig("distr", group_size=4, block_rows=16, layers=layers)  # tiny-random: 8 layers; 2 stages: 4 + 4
    outs = []
    for attention in (AttentionConfig(), cfg):
        runner = load_stage(tiny_dir, arch, rank, world, torch.float32, attention, split="even")
        runner.add_request("r", RequestInfo(96, SamplingParams()), 112)
        rows = [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(TINY_PROMPT)]
        hidden = torch.randn(96, arch.hidden_size, generator=torch.Generator().manual_seed(1)) if rank else None
        outs.append(runner.hidden(MicroBatch(0, rows, hidden)))
    assert torch.equal(outs[0], outs[1]) == (rank == 0 and world == 2)


@pytest.mark.unit
def test_runner_exact_kind_changes_nothing(tiny_dir) -> None:
    default, explicit = (_prefill_logits(r, TINY_PROMPT, 40)
                         for r in _runners(tiny_dir, AttentionConfig("exact", block_rows=16)))
    assert torch.equal(default, explicit)


@pytest.mark.unit
def test_load_stage_threads_the_config(tiny_dir) -> None:
    arch = ModelArch.from_model_dir(tiny_dir)
    cfg = AttentionConfig("distr", group_size=2, block_rows=16)
    assert all(s.attention == cfg for s in (load_stage(tiny_dir, arch, k, 2, torch.float32, cfg) for k in range(2)))
    with pytest.raises(ConfigError, match="does not divide"):
        load_stage(tiny_dir, arch, 0, 2, torch.float32, AttentionConfig("distr", group_size=32))


@pytest.mark.slow
def test_smollm2_distr_g1_keeps_next_token(smollm2_dir) -> None:
    """A real prefill (SmolLM2-135M, 30 layers): G = 1 keeps every next-token argmax of exact attention."""
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "Pipeline parallel serving splits a model's layers " \
        "into stages, and speculative decoding keeps every stage busy by sending draft tokens ahead."
    prompt = load_tokenizer(smollm2_dir).encode(text)
    exact, distr = (_prefill_logits(r, prompt, len(prompt))
                    for r in _runners(smollm2_dir, AttentionConfig("distr", group_size=1, block_rows=16, layers="all")))
    assert len(prompt) >= 48
    # fp32 through 30 layers in another summation order: measured max |Δ| ~1e-5 on logits of scale ~20
    assert (distr - exact).abs().max().item() < 1e-3
    assert torch.equal(distr.argmax(-1), exact.argmax(-1))
