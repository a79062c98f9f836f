"""The layer split by measurement: how many layers' worth of decode time the LM head costs on this host.

    python -m shared.compute.split_measure --model smollm2-135m --stages 2 [--numerics fast] [--threads 1]

The balanced split (shared.types.config.split_layers) weighs the LM head by its weights: a decode step reads
every weight once, so a stage's step should take what its weights take to read. On a CPU a layer costs more
than its weights say (a dozen kernels each, the norms, RoPE, attention over the cache), and the head, one long
product, about what its weights say: on an Intel Xeon (one thread, fp32, smollm2-135m) stage 0's 19 layers took
28.1 ms a step and stage 1's 11 layers and head 24.6 ms, the head worth 5.6 layers' time against 8.0 layers'
weights. SpecPipe's step is paced by its slowest stage (plain PP's token by their sum, which no split changes),
and under prompts stage 0 does more again (the head computes a prompt's last row only).

So this times what the split balances: a one-row decode step after a CONTEXT-token prompt, of the first and the
last stage of the balanced split, each alone in this process (the sizes the stages will have: a few layers would
sit in the CPU's cache and time faster per layer than a stage does). A layer's time is the first stage's over its
layers; the head's, the last stage's less its layers'. `specpipe up --layer-split measured` runs it once, before
any stage starts, in a process of its own (the launcher keeps no weights), and hands every stage the same counts:
a stage never measures for itself, since two timings would cut the model two ways.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from shared.compute.runner import RequestInfo, load_stage
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams, split_layers, stage_bounds

CONTEXT = 256  # prompt tokens cached before the timed steps: a decode step attends to a real cache
ROUNDS = 6  # the two stages take turns this many times (a host's speed drifts: both see the same drift)
STEPS = 6  # timed one-row steps per stage and round; the median over all rounds is kept
WARM_STEPS = 3  # untimed steps first (first calls of each shape)


class StageClock:
    """One stage, loaded, a `context`-token prompt cached: times its decode steps of `rows` rows, from token ids if
    it is the first stage (else from made-up input states), with the LM head if it is the last. `steps`: how many
    timed steps it will be asked for (its request's KV room). benchmarks.bandwidth times its stages with it too."""

    def __init__(self, runner, arch: ModelArch, first: bool, last: bool, context: int = CONTEXT, rows: int = 1,
                 steps: int = ROUNDS * STEPS):
        self.runner, self.last, self.rows, self.times = runner, last, rows, []
        self.inputs = {n: None if first else torch.randn(n, arch.hidden_size) for n in (context, rows)}
        runner.add_request("measure", RequestInfo(context, SamplingParams()),
                           context + rows * (WARM_STEPS + steps) + 1)
        self.position = 0
        self._step(context)
        for _ in range(WARM_STEPS):
            self._step(rows)

    def _step(self, n: int) -> None:
        rows = [Row("measure", -(p + 2), -(p + 1), p, 7 + p % 500, True, False)
                for p in range(self.position, self.position + n)]
        x = self.runner.hidden(MicroBatch(0, rows, self.inputs[n]))  # [n, H]
        if self.last:
            self.runner.logits(x)  # [n, V]
        self.position += n

    def time_steps(self, steps: int) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self._step(self.rows)
            self.times.append(time.perf_counter() - start)


def head_layers(model_dir, arch: ModelArch, stages: int, numerics: str, dtype: torch.dtype) -> dict:
    """The LM head's decode-step time in layers' worth, from the balanced split's first and last stage."""
    bounds = stage_bounds(arch, stages, "balanced")
    first_layers, last_layers = bounds[0][1] - bounds[0][0], bounds[-1][1] - bounds[-1][0]
    with torch.no_grad():
        clocks = [StageClock(load_stage(model_dir, arch, rank, stages, dtype, numerics=numerics), arch,
                              rank == 0, rank == stages - 1) for rank in (0, stages - 1)]
        for _ in range(ROUNDS):
            for clock in clocks:
                clock.time_steps(STEPS)
    first_s, last_s = (statistics.median(c.times) for c in clocks)
    layer_s = first_s / first_layers
    head_s = max(last_s - last_layers * layer_s, 0.0)
    return {"layer_ms": 1e3 * layer_s, "head_ms": 1e3 * head_s, "head_layers": head_s / layer_s,
            "weights_head_layers": arch.head_params / arch.layer_params}


def main(argv: list[str] | None = None) -> int:
    from shared.model_store import resolve_model

    p = argparse.ArgumentParser(prog="python -m shared.compute.split_measure", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--numerics", default="fast", help="the stages' (compiled is timed as fast: no compile here)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads, as each stage will have")
    p.add_argument("--device", default="cpu", help="the stages' (auto: cuda if there is one)")
    a = p.parse_args(argv)
    model_dir = resolve_model(a.model)
    arch = ModelArch.from_model_dir(model_dir)
    if a.device != "cpu" and (a.device != "auto" or torch.cuda.is_available()):  # timed on CPUs only, so far
        counts = [b - s for s, b in stage_bounds(arch, a.stages, "balanced")]
        print(json.dumps({"counts": counts, "why": "stages on a GPU: the weights-balanced split"}))
        return 0
    torch.set_num_threads(a.threads)
    numerics = "fast" if a.numerics == "compiled" else a.numerics
    measured = head_layers(model_dir, arch, a.stages, numerics, getattr(torch, a.dtype))
    counts = [b - s for s, b in split_layers(arch.num_layers, a.stages, measured["head_layers"])]
    print(json.dumps({**measured, "counts": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
