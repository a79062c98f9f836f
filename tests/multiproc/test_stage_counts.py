"""Exact numerics through the real services at 1, 3 and 4 stage processes (2 are covered by test_cluster.py):
every policy's tokens equal plain decoding's, greedy and seeded, with requests sharing the pipe."""

from __future__ import annotations

import pytest

from shared.transport.queue_client import collect
from tests.multiproc.conftest import JOBS, reference, submit_job

pytestmark = pytest.mark.multiproc

# label: (stage processes, policy, draft: "ngram" or "model" = tiny-random itself)
PIPES = {
    "1 stage, pp": (1, "pp", "ngram"),
    "3 stages, tree, draft model": (3, "tree", "model"),
    "4 stages, specpipe, n-gram": (4, "specpipe", "ngram"),
    "4 stages, specpipe, draft model": (4, "specpipe", "model"),
}


@pytest.mark.parametrize("case", list(PIPES))
def test_exact_services_match_plain_decoding(cluster_factory, tiny_dir, case) -> None:
    stages, policy, draft = PIPES[case]
    cluster = cluster_factory(stages=stages, policy=policy, draft=str(tiny_dir) if draft == "model" else "ngram")
    jobs = JOBS[:3]  # greedy, seeded top-k/top-p, seeded hot temperature
    for i, job in enumerate(jobs):
        submit_job(cluster, f"job{i}", job)
    for i, job in enumerate(jobs):
        result = collect(cluster.r, cluster.cfg, f"job{i}", timeout_s=120)
        assert result.finished and result.error is None, (case, i, result)
        assert result.tokens == reference(tiny_dir, *job), f"{case}: request {i} differs from plain decoding"
