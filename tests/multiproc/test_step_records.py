"""The services run the executor's algorithm step for step: for the same request, the scheduler service and the
in-process executor (specpipe/executor.py) send the same rows into stage 0 at every step, verify them into the
same events and emit the same tokens, refills after a miss included (R drafted levels below the bonus token).

A step record of one request, from its first row on: (rows sent into stage 0 [(node, token)], the events of the
verification read in that step [(kind, nodes)], the tokens it emitted). Under async scheduling the verification
read in step t is step t - 1's, in both. The services' records come from what they publish:
the `steps` stream (stage 0's rows; the events of step t's verification go out with step t + 1) and the request's
`out` stream (tokens, stamped with their step)."""

from __future__ import annotations

import pytest

from scheduler.scheduler import Phase, Request
from shared.model_store import resolve_model
from shared.transport.queue_client import collect
from shared.types.config import EngineConfig, ModelArch, PolicyConfig, SamplingParams, default_refill_depth
from shared.wire.messages import StepMsg, TokensMsg, decode
from specpipe.engine import SimulationConfig, build_pipeline
from tests.cluster import Cluster
from tests.multiproc.conftest import submit_job

pytestmark = pytest.mark.multiproc

JOBS = {  # label: (prompt, new tokens, sampling)
    "greedy": ([5, 17, 99, 3, 5, 17, 42, 7, 5, 17, 99, 3], 16, SamplingParams()),
    "seeded": ([11, 12, 13, 11, 12, 13, 11, 12], 12, SamplingParams(1.0, 1.0, 0, 7)),
}
WIDTH, BRANCH, CHUNK, BUDGET = 4, 4, 64, 256  # the scheduler service's defaults (shared/service_args.py)
# smollm2 copies a list back, so the n-gram draft both hits and misses on real text
LIST_PROMPT = ("Copy this list exactly, one item per line: red apple, green pear, blue plum, red apple, green pear, "
               "blue plum, yellow lemon, red apple, green pear.")

# label: (model, stage processes, refill depth (None: the services' default_refill_depth), draft: "model" is the
# target itself (greedy: every level accepted; seeded: tiny-random's near-uniform draws miss, so every step after
# the first refills), "ngram" (looked up in the scheduler, as on a CPU host) or "ngram-worker" (in a draft worker, as
# with GPU stages); async scheduling: each step scheduled before the last verification is read)
PIPES = {
    "tiny-random, 2 stages, draft model": ("tiny", 2, None, "model", False),
    "tiny-random, 3 stages, draft model": ("tiny", 3, None, "model", False),
    "tiny-random, 4 stages, draft model": ("tiny", 4, None, "model", False),
    "tiny-random, 4 stages, draft model, refill depth 1": ("tiny", 4, 1, "model", False),
    "tiny-random, 3 stages, draft model, no refill levels": ("tiny", 3, 0, "model", False),
    "tiny-random, 2 stages, draft model, async scheduling": ("tiny", 2, None, "model", True),
    "tiny-random, 4 stages, draft model, async scheduling": ("tiny", 4, None, "model", True),
    "smollm2, 2 stages, n-gram": ("smollm2-135m", 2, None, "ngram", False),
    "smollm2, 2 stages, n-gram, async scheduling": ("smollm2-135m", 2, None, "ngram", True),
    "smollm2, 2 stages, n-gram in a draft worker": ("smollm2-135m", 2, None, "ngram-worker", False),
}


def _records(steps: dict[int, dict], tokens: dict[int, list[int]]) -> list[tuple]:
    """Per step from the request's first row to its last token: (rows, events, tokens)."""
    first, last = min(s for s, rec in steps.items() if rec.get("rows")), max(tokens)
    return [(steps.get(s, {}).get("rows", []), steps.get(s, {}).get("events", []), tokens.get(s, []))
            for s in range(first, last + 1)]


def executor_records(model_dir, draft: str, stages: int, refill: int, prompt: list[int], n: int,
                     sampling: SamplingParams, overlap: bool = False) -> tuple[list[tuple], list[int]]:
    """The executor's records, and the rows of each refill it sent (the bonus token and its drafted levels)."""
    arch = ModelArch.from_model_dir(model_dir)
    cfg = SimulationConfig(model=str(model_dir), draft=draft,
                           policy=PolicyConfig("specpipe", stages, WIDTH, refill_depth=refill, branch=BRANCH,
                                               width_rule="budget", async_scheduling=overlap),
                           engine=EngineConfig(prefill_chunk=CHUNK, token_budget=BUDGET, numerics="exact"))
    pipe = build_pipeline(cfg, trace_limit=1)[0]
    state = pipe.submit(Request("r", tuple(prompt), sampling, n, frozenset(arch.eos_token_ids)))
    steps, tokens, refills = {}, {}, []
    while state.finish_reason is None:
        refill = state.needs_refill and state.phase is Phase.DECODE
        result = pipe.step()
        sent = [(node, token) for _, node, token in pipe.trace[-1].stages[0]]
        refills += [len(sent)] if refill else []
        events = [(e.kind, list(e.node_ids)) for e in result.events if e.request_id == "r"]
        steps[pipe.scheduler.step] = {"rows": sent, "events": events}
        if result.new_tokens.get("r"):
            tokens[pipe.scheduler.step] = result.new_tokens["r"]
    return _records(steps, tokens), refills


def service_records(cluster: Cluster, request_id: str) -> list[tuple]:
    steps: dict[int, dict] = {}
    for _, fields in cluster.r.xrange(cluster.cfg.steps):
        msg = decode(fields[b"m"], StepMsg)
        rows = [(r.node_id, r.token) for r in msg.rows() if r.request_id == request_id]
        steps.setdefault(msg.step, {})["rows"] = rows
        # the events of step t's verification go out with step t + 1
        steps.setdefault(msg.step - 1, {})["events"] = [(e.kind, list(e.node_ids)) for e in msg.events
                                                       if e.request_id == request_id]
    tokens = {}
    for _, fields in cluster.r.xrange(cluster.cfg.out(request_id)):
        msg = decode(fields[b"m"], TokensMsg)
        if msg.tokens:
            tokens[msg.step] = msg.tokens
    return _records(steps, tokens)


def _last_events_dropped(records: list[tuple]) -> list[tuple]:
    """The last verification's events go out with the next step, which a cluster left idle never sends."""
    return [*records[:-1], (records[-1][0], None, records[-1][2])]


def _jobs(model: str, model_dir) -> dict[str, tuple]:
    if model == "tiny":
        return JOBS
    from shared.model_store import load_tokenizer
    from specpipe.prompts import encode_chat

    return {"greedy": (encode_chat(load_tokenizer(model_dir), LIST_PROMPT), 40, SamplingParams())}


@pytest.mark.parametrize("case", list(PIPES))
def test_services_and_executor_step_alike(tmp_path, tiny_dir, case, request) -> None:
    model, stages, refill, draft, overlap = PIPES[case]
    if model != "tiny":
        request.applymarker(pytest.mark.slow)
    model_dir = tiny_dir if model == "tiny" else resolve_model(model)
    ngram_in = "workers" if draft == "ngram-worker" else "scheduler"
    draft = {"model": str(model_dir), "ngram-worker": "ngram"}.get(draft, draft)
    refill = default_refill_depth(stages) if refill is None else refill
    jobs = _jobs(model, model_dir)
    # a generous draft wait: an answer takes milliseconds, and a late one would change the tree
    cluster = Cluster(tmp_path, str(model_dir), stages=stages, draft=draft, ngram_in=ngram_in,
                      extra=("--refill-depth", str(refill), "--draft-mode", "wait", "--draft-wait-ms", "20000",
                             "--trace-steps", "--width-rule", "budget",  # the cost rule learns from wall-clock beats
                             *(["--async-scheduling"] if overlap else [])))
    try:
        for label, (prompt, n, sampling) in jobs.items():  # one at a time: each request's steps are its own
            s = sampling
            submit_job(cluster, label, (prompt, n, s.temperature, s.top_p, s.top_k, s.seed))
            result = collect(cluster.r, cluster.cfg, label, timeout_s=180)
            assert result.finished and result.error is None, (case, label, result)
        refills = []
        for label, (prompt, n, sampling) in jobs.items():
            expected, refill_rows = executor_records(model_dir, draft, stages, refill, prompt, n, sampling, overlap)
            got = service_records(cluster, label)
            assert _last_events_dropped(got) == _last_events_dropped(expected), f"{case}: {label}: steps differ"
            refills += refill_rows
        # the case exercises what it names: a refill carries the bonus token and up to R levels of W nodes
        assert max(refills) > 1 if refill else max(refills) == 1, (case, refills)
        assert max(refills) <= 1 + refill * WIDTH
    finally:
        cluster.close()
