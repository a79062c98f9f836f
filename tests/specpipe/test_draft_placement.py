"""Where `specpipe up` drafts: the n-gram lookup in the scheduler's process where the stages compute on the CPU, in
draft worker processes where they compute on GPUs (or as --ngram-in says); a draft model in draft worker processes
(specpipe.cluster.ClusterConfig.local_ngram)."""

from __future__ import annotations

import pytest

from scheduler.__main__ import parser as scheduler_parser
from specpipe import cluster
from specpipe.cluster import ClusterConfig, commands

pytestmark = pytest.mark.unit

# label: ClusterConfig fields -> (draft worker processes, the scheduler's --local-draft, its --ngram-shared)
PLACEMENTS = {
    "n-gram, CPU stages: in the scheduler": ({"device": "cpu"}, [], "ngram", 0),
    "n-gram, GPU stages: in workers": ({"device": "cuda", "drafts": 2}, ["draft-0", "draft-1"], "none", 0),
    "n-gram, GPU stages, asked in the scheduler": ({"device": "cuda:1", "ngram_in": "scheduler"}, [], "ngram", 0),
    "n-gram, CPU stages, asked in workers": ({"device": "cpu", "ngram_in": "workers"}, ["draft-0"], "none", 0),
    "n-gram with a table across requests": ({"device": "cpu", "ngram_shared": 4096}, [], "ngram", 4096),
    "a draft model: in workers": ({"device": "cpu", "draft": "qwen2.5-coder-0.5b"}, ["draft-0"], "none", 0),
    "pp: n-gram for the requests that ask for speculation": ({"device": "cpu", "policy": "pp"}, [], "ngram", 0),
    "no draft (--drafts 0)": ({"device": "cpu", "drafts": 0}, [], "none", 0),
}


@pytest.mark.parametrize("case", list(PLACEMENTS))
def test_where_the_draft_runs(case) -> None:
    fields, workers, local, shared = PLACEMENTS[case]
    cfg = ClusterConfig(stages=2, **fields)
    procs = commands(cfg)
    assert [name for name in procs if name.startswith("draft-")] == workers
    args = scheduler_parser().parse_args(procs["scheduler"][3:])
    assert (args.local_draft, args.ngram_shared) == (local, shared)


def test_auto_follows_where_the_stages_compute(monkeypatch) -> None:
    """No --device: each stage takes a GPU where it sees one, and the n-gram draft goes where the stages are."""
    import torch

    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert ClusterConfig(stages=2).local_ngram == (not gpu)


@pytest.mark.parametrize("flags, workers", [(["--device", "cpu"], 0),
                                            (["--device", "cpu", "--ngram-in", "workers"], 1)],
                         ids=["default", "--ngram-in workers"])
def test_up_takes_the_placement(monkeypatch, flags, workers) -> None:
    started = []
    monkeypatch.setattr(cluster, "up", lambda cfg: started.append(cfg) or 0)
    assert cluster.up_main(["--stages", "2", *flags]) == 0
    assert started[0].draft_workers == workers and started[0].local_ngram == (not workers)
