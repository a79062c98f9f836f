"""Cost models: measured step times that turn counted pipeline steps into time.

A cost model holds tables, not formulas guessed in advance:
  target.layer[n][L]  seconds for one decoder layer over a micro-batch of n rows
                      whose KV context is L tokens (row-invariant path, as served)
  target.head[n]      final norm + LM head over n rows (last stage)
  draft.layer, draft.head   the same for the draft model (one draft forward =
                      draft.layers x layer + head)
  transfer[n]         one stage-to-stage send of n rows' hidden states + metadata
Between measured points the tables are interpolated linearly (beyond the last
point, extrapolated along the last segment). Each model is measured with random
weights of the real shapes (timing does not depend on weight values) and stored
as JSON with how, where and when it was measured, so a report can be
regenerated anywhere from the JSON alone.
"""

from __future__ import annotations

import bisect
import datetime
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.provenance import measuring_machine
from shared.compute.model import LayerWeights
from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import StageWeights
from shared.types.batch import ROOT_PARENT, MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) through the measured points (extrapolated past the ends)."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Table2D:
    """seconds[i][j] measured at rows[i] and context[j]."""

    rows: list[int]
    context: list[int]
    seconds: list[list[float]]

    def __call__(self, n: float, length: float) -> float:
        per_row = [_interp(self.context, line, length) for line in self.seconds]  # at this L, per n
        return _interp(self.rows, per_row, n)


@dataclass(frozen=True)
class Table1D:
    rows: list[int]
    seconds: list[float]

    def __call__(self, n: float) -> float:
        return _interp(self.rows, self.seconds, n)


@dataclass(frozen=True)
class ModelCost:
    name: str
    layers: int
    layer: Table2D
    head: Table1D

    def forward(self, n: int, length: float, layers: int | None = None, head: bool = True) -> float:
        """Seconds for `layers` decoder layers (default all) over n rows at context L, plus the head."""
        if n <= 0:
            return 0.0
        t = (self.layers if layers is None else layers) * self.layer(n, length)
        return t + (self.head(n) if head else 0.0)


@dataclass(frozen=True)
class CostModel:
    target: ModelCost
    draft: ModelCost | None  # None: the draft is n-gram lookup (no forward to time)
    transfer: Table1D
    provenance: dict

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        d = json.loads(Path(path).read_text())
        model = lambda m: ModelCost(m["name"], m["layers"], Table2D(**m["layer"]), Table1D(**m["head"]))
        return cls(model(d["target"]), model(d["draft"]) if d["draft"] else None, Table1D(**d["transfer"]),
                   d["provenance"])


# ---- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasureConfig:
    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    context: tuple[int, ...] = (128, 512, 1024)
    layers: int = 2  # layers actually built and timed; per-layer time = total / layers
    repeats: int = 5  # median of this many timed forwards after one warm-up
    device: str = "cpu"
    dtype: str = "float32"
    draft_dtype: str | None = None  # None: the target's dtype
    numerics: str = "fast"  # the kernels timed (NUMERICS): fast is what the services run by default
    draft_vocab: int = 0  # > 0: the draft's head timed over this many tokens (EngineConfig.draft_vocab); 0: all

    @property
    def draft(self) -> MeasureConfig:
        """The same settings with the draft's dtype (a bf16 draft stays lossless; the target verifies)."""
        return replace(self, dtype=self.draft_dtype or self.dtype, draft_dtype=None)


def _llama_shape(hidden: int, inter: int, layers: int, heads: int, kv: int) -> ModelArch:
    return ModelArch(128256, hidden, inter, layers, heads, kv, hidden // heads, 500000.0, 1e-5, False, False,
                     131072, ())


SHAPES = {  # the paper's deployment shapes, for a GPU cost model (random weights, timing only)
    "llama-70b": _llama_shape(8192, 28672, 80, 64, 8),
    "llama-1b": _llama_shape(2048, 8192, 16, 32, 8),
}


def random_stage(arch: ModelArch, layers: int, head: bool, device: str, dtype: torch.dtype,
                 numerics: str = "fast") -> StageRunner:
    """A StageRunner of `layers` layers of arch's shape with random weights (timing only)."""
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they live: a 70B shape's GBs in seconds on a GPU
    H, I, h, kv, d = arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads, arch.head_dim

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(dtype)

    layer = lambda: LayerWeights(w((h + 2 * kv) * d, H), w((h + 2 * kv) * d) if arch.qkv_bias else None,
                                 w(H, h * d), w(2 * I, H), w(H, I), w(H) + 1, w(H) + 1)
    embed = w(arch.vocab_size, H)
    weights = StageWeights(0, layers, [layer() for _ in range(layers)], embed, w(H) + 1 if head else None,
                           (embed if arch.tie_embeddings else w(arch.vocab_size, H)) if head else None)
    return StageRunner(arch, weights, numerics=numerics)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_layers(runner: StageRunner, cfg: MeasureConfig) -> Table2D:
    """Per-layer seconds of a speculative micro-batch of n sibling rows over a committed context of L."""
    seconds = []
    for n in cfg.rows:
        line = []
        for length in cfg.context:
            runner.add_request("m", RequestInfo(length, SamplingParams()), length + n + 8)
            prefix = [Row("m", -(p + 2), -(p + 1), p, 1, True, False) for p in range(length)]
            with torch.no_grad():
                for start in range(0, length, 256):  # fill the context (timing only)
                    runner.hidden(MicroBatch(0, prefix[start:start + 256]))
                rows = [Row("m", i, ROOT_PARENT, length, 1, False, True) for i in range(n)]
                cache = runner.kv["m"]

                def step(rows: list[Row] = rows, cache=cache, n: int = n) -> None:
                    runner.hidden(MicroBatch(1, rows))
                    cache.prune(set(range(n)))

                line.append(_median_time(step, cfg.repeats, cfg.device) / runner.num_layers)
            runner.release("m")
        seconds.append(line)
    return Table2D(list(cfg.rows), list(cfg.context), seconds)


def measure_head(runner: StageRunner, cfg: MeasureConfig) -> Table1D:
    x = {n: torch.randn(n, runner.arch.hidden_size, dtype=runner.dtype, device=cfg.device) for n in cfg.rows}
    with torch.no_grad():
        return Table1D(list(cfg.rows), [_median_time(lambda n=n: runner.logits(x[n]), cfg.repeats, cfg.device)
                                        for n in cfg.rows])


def measure_model(name: str, arch: ModelArch, cfg: MeasureConfig) -> ModelCost:
    runner = random_stage(arch, cfg.layers, head=True, device=cfg.device, dtype=getattr(torch, cfg.dtype),
                          numerics=cfg.numerics)
    return ModelCost(name, arch.num_layers, measure_layers(runner, cfg), measure_head(runner, cfg))


def provenance(cfg: MeasureConfig, what: str) -> dict:
    return {
        "what": what,
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": measuring_machine(cfg.device),
        "torch": torch.__version__, "device": cfg.device, "dtype": cfg.dtype, "draft_dtype": cfg.draft.dtype,
        "numerics": cfg.numerics, "draft_vocab": cfg.draft_vocab,
        "method": (f"random weights of the real shapes; {cfg.layers} layers built and timed, per-layer time = "
                   f"total / {cfg.layers}; median of {cfg.repeats} forwards after a warm-up; "
                   "speculative sibling rows over a committed context filled first; "
                   "transfer = the stage link's send/recv of [n, hidden] + metadata between two processes "
                   "(TCP on CPU, NCCL on GPUs)"),
    }
