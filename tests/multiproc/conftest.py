"""What the multi-process tests share: a factory of real clusters, the jobs, and their in-process reference."""

from __future__ import annotations

import pytest

from shared.transport.queue_client import submit
from shared.types.config import SamplingParams
from shared.wire.messages import RequestMsg, SamplingFields
from tests.cluster import Cluster
from tests.helpers import pipeline

JOBS = [  # prompt, new tokens, temperature, top_p, top_k, seed
    ([5, 17, 99, 3, 5, 17, 42, 7], 14, 0.0, 1.0, 0, 0),
    ([7, 7, 8, 9, 7, 7, 8], 9, 0.8, 0.9, 50, 7),
    (list(range(40, 90)), 11, 1.5, 1.0, 0, 123),
    ([300, 301, 300, 301, 300], 6, 0.0, 1.0, 0, 0),
    ([11, 12, 13, 11, 12, 13, 11], 16, 1.0, 0.95, 20, 99),
    ([2000, 2001], 5, 0.0, 1.0, 0, 0),
]


def reference(tiny_dir, prompt, n, t, p, k, seed) -> list[int]:
    """Plain decoding in process (pp, one stage), same sampling and seed."""
    from scheduler.scheduler import Request

    return pipeline(tiny_dir, "pp", 1).generate(Request("ref", tuple(prompt), SamplingParams(t, p, k, seed), n)).output


def submit_job(cluster: Cluster, request_id: str, job, **fields) -> None:
    prompt, n, t, p, k, seed = job
    submit(cluster.r, cluster.cfg, RequestMsg(request_id, prompt, n, SamplingFields(t, p, k, seed), **fields))


@pytest.fixture
def cluster_factory(tmp_path, tiny_dir):
    """make(**Cluster kwargs) -> a running cluster on tiny-random; every one is closed at the end."""
    made = []

    def make(**kw) -> Cluster:
        cluster = Cluster(tmp_path, str(tiny_dir), **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
