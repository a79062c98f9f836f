"""Numerics `compiled` (shared/compute/compiled.py): micro-batches of up to MAX_ROWS rows through Inductor's kernels
compute the same function as fast numerics up to fp32 rounding; larger ones keep the fast path; pipelines decode
as plain decoding does; a stage that cannot compile says so when built."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from scheduler.scheduler import Request
from shared.compute import compiled
from shared.compute.compiled import MAX_ROWS
from shared.compute.runner import StageRunner, load_stage
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams
from shared.types.errors import ConfigError
from tests.helpers import pipeline
from tests.shared.compute.trees import prefill

pytestmark = pytest.mark.unit


def _stage(model_dir, numerics: str) -> StageRunner:
    """The whole model as one stage: its layers and its LM head."""
    return load_stage(model_dir, ModelArch.from_model_dir(model_dir), 0, 1, numerics=numerics)


def _decode_states(runner: StageRunner, prompt: list[int], tokens: list[int], rows: int) -> list[torch.Tensor]:
    """Prefill `prompt`, then feed `tokens` `rows` at a time as committed rows: each step's output states."""
    prefill(runner, "r", prompt)
    states, position = [], len(prompt)
    for i in range(0, len(tokens), rows):
        chunk = tokens[i : i + rows]
        step = [Row("r", 10**6 + position + j, -1, position + j, t, True, True) for j, t in enumerate(chunk)]
        states.append(runner.hidden(MicroBatch(1 + i, step)))
        position += len(step)
    return states


# label: (model fixture, tokens per step); up to MAX_ROWS rows go through the compiled kernels, more keep fast
# numerics' products
STEPS = {"tiny-random, one row": ("tiny_dir", 1), "tiny-random, two rows": ("tiny_dir", 2),
         "tiny-random, three rows": ("tiny_dir", 3), "smollm2-135m, one row": ("smollm2_dir", 1),
         "smollm2-135m, two rows": ("smollm2_dir", 2)}


@pytest.mark.parametrize("case", list(STEPS))
def test_decode_steps_match_fast_numerics_within_rounding(request, case) -> None:
    model, rows = STEPS[case]
    model_dir = request.getfixturevalue(model)
    prompt, tokens = list(range(30, 70)), [5, 17, 99, 3, 250, 8]
    fast, compiled_ = _stage(model_dir, "fast"), _stage(model_dir, "compiled")
    assert compiled_.few_rows is not None
    for a, b in zip(_decode_states(fast, prompt, tokens, rows), _decode_states(compiled_, prompt, tokens, rows)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled_.logits(b), fast.logits(a), rtol=1e-4, atol=1e-4)


def test_only_micro_batches_of_up_to_max_rows_take_the_compiled_kernels(tiny_dir, monkeypatch) -> None:
    assert MAX_ROWS == 2
    runner = _stage(tiny_dir, "compiled")
    calls: list[int] = []
    layer = runner.few_rows.layer
    monkeypatch.setattr(runner.few_rows, "layer", lambda x, *a: calls.append(x.shape[0]) or layer(x, *a))
    _decode_states(runner, list(range(30, 40)), [5, 17, 99], 1)
    _decode_states(_reuse(runner), list(range(30, 40)), [5, 17, 99, 3], 2)
    _decode_states(_reuse(runner), list(range(30, 40)), [5, 17, 99], 3)
    assert calls == [1] * 3 * runner.num_layers + [2] * 2 * runner.num_layers


@pytest.mark.parametrize("grad", [True, False], ids=["grad enabled", "under no_grad"])
def test_the_first_requests_compile_nothing_the_warm_up_did_not(tiny_dir, grad) -> None:
    """Compiling happens when the stage is built: real steps (1 and 2 rows, their logits) find their graphs, in
    either grad mode."""
    runner = _stage(tiny_dir, "compiled")
    built = dict(counters["stats"])
    with torch.set_grad_enabled(grad):
        for rows in (1, 2):
            runner.logits(_decode_states(_reuse(runner), list(range(30, 40)), [5, 17, 99, 3], rows)[-1])
    assert dict(counters["stats"]) == built


def _reuse(runner: StageRunner) -> StageRunner:
    runner.release("r")
    return runner


# label: (policy, stages)
PIPELINES = {"pp, 2 stages": ("pp", 2), "specpipe, 2 stages": ("specpipe", 2), "specpipe, 4 stages": ("specpipe", 4)}


@pytest.mark.parametrize("case", list(PIPELINES))
def test_compiled_pipeline_greedy_tokens_agree_with_plain_decoding(tiny_dir, case) -> None:
    policy, stages = PIPELINES[case]
    for i, prompt in enumerate([[5, 17, 99, 3, 5, 17, 42, 7], list(range(40, 90))]):
        plain = pipeline(tiny_dir, "pp", 1).generate(Request(f"p{i}", tuple(prompt), SamplingParams(), 16)).output
        pipe = pipeline(tiny_dir, policy, stages, numerics="compiled")
        assert pipe.generate(Request(f"c{i}", tuple(prompt), SamplingParams(), 16)).output == plain


def test_a_stage_that_cannot_compile_is_a_clear_error_when_built(tiny_dir, monkeypatch) -> None:
    def no_compiler(fn, **kw):
        def fails(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return fails

    monkeypatch.setattr(compiled.torch, "compile", no_compiler)
    with pytest.raises(ConfigError, match="numerics compiled: TorchInductor could not compile .*no C\\+\\+ compiler"):
        _stage(tiny_dir, "compiled")


def test_each_row_count_runs_kernels_built_with_its_options(tiny_dir, monkeypatch) -> None:
    """Every compiled function contracts multiply-adds (FMA: a second row nearly free), and a micro-batch of n rows
    runs the functions built with ROW_FLAGS[n] (one row realizes element-wise results first, two do not)."""
    calls: list[tuple[int, dict]] = []

    def compile_(fn, **kw):
        assert kw["dynamic"] is False and kw["fullgraph"] is True
        return lambda x, *a: calls.append((x.shape[0], kw["options"])) or fn(x, *a)

    monkeypatch.setattr(compiled.torch, "compile", compile_)
    runner = _stage(tiny_dir, "compiled")
    for rows in (1, 2):
        runner.logits(_decode_states(_reuse(runner), list(range(30, 40)), [5, 17, 99, 3], rows)[-1])
    assert {n for n, _ in calls} == {1, 2} == set(compiled.ROW_FLAGS)
    assert all(options == compiled.ROW_FLAGS[n] and options.items() >= compiled.FMA.items() for n, options in calls)
    assert compiled.ROW_FLAGS[1] != compiled.ROW_FLAGS[2]
