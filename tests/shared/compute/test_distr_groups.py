"""DistrAttention's column groups: the SimHash codes, the Gray-code bucket, strided and adjacent groups."""

from __future__ import annotations

import pytest
import torch

from shared.compute.distr_attention import distr_attention
from shared.compute.distr_groups import column_groups, hash_projections, simhash_codes
from shared.types.config import AttentionConfig


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.unit
def test_simhash_codes_are_seeded_angular_and_in_range() -> None:
    columns = gaussian(3, 16, 32)  # [heads, d, l]
    projections = hash_projections(AttentionConfig("distr", block_rows=32, hash_bits=12, seed=7), torch.float32)
    codes = simhash_codes(columns, projections)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 2**12 and len(set(codes.flatten().tolist())) > 24
    assert torch.equal(simhash_codes(3.0 * columns, projections), codes)  # a column's length does not count
    other_seed = hash_projections(AttentionConfig("distr", block_rows=32, hash_bits=12, seed=8), torch.float32)
    assert not torch.equal(simhash_codes(columns, other_seed), codes)


@pytest.mark.unit
def test_gray_bucket_is_the_reflected_gray_code_of_the_hash() -> None:
    """The authors' perm[bin] with perm[x] = x ^ (x >> 1): neighbouring buckets differ in one hash bit."""
    columns = gaussian(2, 64, 128)
    projections = hash_projections(AttentionConfig("distr"), torch.float32)
    binary, gray = simhash_codes(columns, projections, "binary"), simhash_codes(columns, projections, "gray")
    assert torch.equal(gray, binary ^ (binary >> 1)) and not torch.equal(gray, binary)
    table = torch.arange(2**16)
    flips = (table ^ (table >> 1))[1:] ^ (table ^ (table >> 1))[:-1]  # consecutive Gray codes
    assert torch.all((flips & (flips - 1)) == 0)  # one bit each


def sorted_order(q: torch.Tensor, cfg: AttentionConfig) -> torch.Tensor:
    """The argsort of the first block's bucket codes. q: [n, h, d] -> [h, d]."""
    columns = q[: cfg.block_rows].permute(1, 2, 0)  # [h, d, l]
    codes = simhash_codes(columns, hash_projections(cfg, q.dtype), cfg.bucket)
    return torch.sort(codes, dim=-1, stable=True).indices


LAYOUTS = {  # layout, group size, group j of the order
    "strided G=2": ("strided", 2, lambda order, j, d, G: order[j :: d // G]),
    "strided G=4": ("strided", 4, lambda order, j, d, G: order[j :: d // G]),
    "adjacent G=2": ("adjacent", 2, lambda order, j, d, G: order[G * j : G * j + G]),
    "adjacent G=4": ("adjacent", 4, lambda order, j, d, G: order[G * j : G * j + G]),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(LAYOUTS), ids=list(LAYOUTS))
def test_groups_follow_the_layout(case) -> None:
    layout, G, group = LAYOUTS[case]
    q = gaussian(128, 3, 32)
    cfg = AttentionConfig("distr", group_size=G, block_rows=128, layout=layout)
    groups = column_groups(q, cfg)  # [1, h, G, d/G]
    assert groups.shape == (1, 3, G, 32 // G)
    for head, order in enumerate(sorted_order(q, cfg).tolist()):
        for j in range(32 // G):
            assert groups[0, head, :, j].tolist() == group(order, j, 32, G)


@pytest.mark.unit
def test_ragged_last_block_hashes_its_own_rows() -> None:
    """The zero-padded last block groups as its m rows alone would."""
    q = gaussian(200, 2, 32)
    cfg = AttentionConfig("distr", block_rows=128)
    assert torch.equal(column_groups(q, cfg)[1], column_groups(q[128:], cfg)[0])


def paired_q(n: int, h: int, d: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Q whose d columns come in identical pairs at random places. -> q [n, h, d], the pairs."""
    gen = torch.Generator().manual_seed(seed)
    places = torch.randperm(d, generator=gen).view(-1, 2)  # [d/2, 2]
    distinct = torch.randn(n, h, d // 2, generator=gen)
    q = torch.empty(n, h, d)
    q[..., places[:, 0]], q[..., places[:, 1]] = distinct, distinct
    return q, [tuple(sorted(p)) for p in places.tolist()]


@pytest.mark.unit
def test_adjacent_groups_pair_identical_columns_and_strided_groups_do_not() -> None:
    """Identical columns hash alike and sort next to each other: adjacent groups of 2 are exactly the pairs
    (so G = 2 is exact there); strided groups pair rank j with rank j + d/2, never a column with its twin."""
    q, pairs = paired_q(32, 4, 32, seed=3)
    k, v = gaussian(32, 4, 32, seed=4), gaussian(32, 4, 32, seed=5)

    def found(layout: str) -> list[list[tuple[int, int]]]:
        groups = column_groups(q, AttentionConfig("distr", block_rows=32, layout=layout))[0]  # [h, 2, d/2]
        return [sorted(tuple(sorted(g)) for g in head.T.tolist()) for head in groups]

    assert all(head == sorted(pairs) for head in found("adjacent"))
    assert all(not set(head) & set(pairs) for head in found("strided"))
    assert pairs != [(i, i + 1) for i in range(0, 32, 2)]  # the pairs were not neighbours to begin with
    exact = distr_attention(q, k, v, AttentionConfig("distr", group_size=1, block_rows=32))
    adjacent = distr_attention(q, k, v, AttentionConfig("distr", block_rows=32, layout="adjacent"))
    strided = distr_attention(q, k, v, AttentionConfig("distr", block_rows=32, layout="strided"))
    assert (adjacent - exact).abs().max().item() < 1e-5 < (strided - exact).abs().max().item()


@pytest.mark.unit
@pytest.mark.parametrize("layout", ["strided", "adjacent"])
def test_same_permutation_of_q_and_k_columns_leaves_result_unchanged(layout) -> None:
    q, k, v = gaussian(96, 4, 32, seed=5), gaussian(96, 2, 32, seed=6), gaussian(96, 2, 32, seed=7)
    cfg = AttentionConfig("distr", group_size=4, block_rows=32, hash_bits=32, layout=layout)
    columns = q.view(3, 32, 4, 32).permute(0, 2, 3, 1)  # [blocks, h, d, l]
    codes = simhash_codes(columns, hash_projections(cfg, q.dtype), cfg.bucket)  # [blocks, h, d]
    assert all(len(set(c)) == 32 for c in codes.flatten(0, 1).tolist())  # no ties: the sort is order-free
    shuffle, other = torch.randperm(32, generator=torch.Generator().manual_seed(1)), torch.arange(31, -1, -1)
    out = distr_attention(q, k, v, cfg)
    assert torch.equal(distr_attention(q[..., shuffle], k[..., shuffle], v, cfg), out)
    assert (distr_attention(q[..., shuffle], k[..., other], v, cfg) - out).norm() > 0.1 * out.norm()
