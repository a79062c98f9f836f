"""`specpipe bench [--quick] [--out DIR]`: regenerate BENCHMARKS.md and its plots from scratch.

Sections (each a module of this package):
  1  single request: TBT of pp / tree / specpipe at N = 2, 4, 8, steps counted with the
     real models and timed with every cost model (tbt.py, costmodel.py, timeline.py);
     the same on the real services with 2 stage processes (serving.py)
  2  against what users run instead: transformers generate / assisted generation (serving.py)
  3  many requests: SpecPipe-DB vs PP with continuous batching, modeled at 8 stages
     (load_model.py) and on the real services (serving.py)
  4  resources: peak memory per stage process, wire overhead share (serving.py)
  5  DistrAttention (attention.py)
BENCHMARKS.md goes to OUT; its runs, plots, results.json and logs to the results folder: benchmarks/results/ for
the repository's own report, OUT itself for any other. Runs are cached under its runs/ (an interrupted run resumes
with --resume).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks import attention, plots, serving, tbt
from benchmarks.costmodel import SHAPES, CostModel, MeasureConfig, measure_head, measure_model, provenance, random_stage
from benchmarks.load_model import LoadModelConfig, compare
from benchmarks.load_model import run_all as load_all
from benchmarks.report_md import SECTIONS, render
from benchmarks.transfer import measure_transfer
from draft_worker.vocab import subset_tokens
from shared.model_store import resolve_model
from shared.types.config import DTYPES, NUMERICS, ModelArch, SamplingParams
from shared.types.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT.parent / "shared" / "data" / "prompts"
COSTS = Path(__file__).resolve().parent / "costs"
RESULTS = Path(__file__).resolve().parent / "results"  # the repository's report: its runs, plots, results.json
SAMPLINGS = {"greedy": SamplingParams(), "t1": SamplingParams(temperature=1.0, seed=0)}


@dataclass(frozen=True)
class BenchConfig:
    out: Path
    quick: bool
    model: str
    draft: str
    workloads: tuple[Path, ...]
    prompts_per_workload: int
    max_new_tokens: int
    stages: tuple[int, ...]
    samplings: tuple[str, ...]
    width: int
    depth: int
    refill_depth: int
    cost_models: tuple[Path, ...]  # stored cost models; the first is measured here if it is missing
    measure: MeasureConfig
    load_stages: int
    load_requests: int
    load_tokens: int
    load_concurrency: tuple[int, ...]
    load_rate_fractions: tuple[float, ...]
    sections: tuple[str, ...] = SECTIONS
    draft_dtype: str = "float32"  # the draft model's dtype in sections 1 and 3 (bfloat16 stays lossless)
    sampled_stages: tuple[int, ...] | None = None  # section 1's stage counts for non-greedy sampling; None: `stages`

    @property
    def results(self) -> Path:
        """Where the runs, plots, results.json and logs go (BENCHMARKS.md goes to `out`)."""
        return results_dir(self.out)

    @property
    def runs(self) -> Path:
        """The cached runs (`--resume` keeps them)."""
        return self.results / "runs"

    def link(self, name: str) -> str:
        """`name` in the results folder, relative to BENCHMARKS.md (what its links say)."""
        return (self.results.resolve().relative_to(self.out.resolve()) / name).as_posix()


def results_dir(out: Path) -> Path:
    """The results folder of a report written to `out`: benchmarks/results/ when `out` is the repository
    (BENCHMARKS.md at its root), `out` itself for any other folder."""
    return RESULTS if out.resolve() == ROOT else out


def quick_config(out: Path) -> BenchConfig:
    """A few minutes on 2 cores: smollm2-135m with n-gram drafts, short outputs."""
    return BenchConfig(
        out=out, quick=True, model="smollm2-135m", draft="ngram",
        workloads=tuple(PROMPTS / f for f in ("mt_bench.jsonl", "alpaca.jsonl", "sum.jsonl")),
        prompts_per_workload=1, max_new_tokens=24, stages=(2, 4), samplings=("greedy",), width=4, depth=3,
        refill_depth=3, cost_models=(results_dir(out) / "runs" / "cpu-smollm2-135m.json",),
        measure=MeasureConfig(rows=(1, 8, 64), context=(128, 1024), repeats=3),
        load_stages=4, load_requests=8, load_tokens=16, load_concurrency=(1, 4), load_rate_fractions=(0.5,))


def full_config(out: Path) -> BenchConfig:
    """The report: the Qwen2.5-Coder 1.5B / 0.5B pair (hours on this 2-core CPU, fp32 at about a second per
    pipeline step; resumable). Sized to what that allows: one prompt per workload and 64 new tokens in
    section 1; in section 3 (modeled) 8 requests of 32 tokens per load point, concurrency 2 and 8 and Poisson
    arrivals at pp's saturated rate (the real services' sweep, on smollm2-135m, has the wider grid)."""
    gpu = COSTS / "gpu-llama-70b.json"
    return BenchConfig(
        out=out, quick=False, model="qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b",
        workloads=tuple(PROMPTS / f for f in ("mt_bench.jsonl", "alpaca.jsonl", "sum.jsonl")),
        prompts_per_workload=1, max_new_tokens=64, stages=(2, 4, 8), samplings=("greedy", "t1"),
        sampled_stages=(8,), width=8, depth=4, refill_depth=7,
        cost_models=(COSTS / "cpu-qwen2.5-coder.json", *((gpu,) if gpu.exists() else ())),
        measure=MeasureConfig(), load_stages=8, load_requests=8, load_tokens=32,
        load_concurrency=(2, 8), load_rate_fractions=(1.0,))


# ---- cost models ------------------------------------------------------------------------------


def _arch(name: str) -> ModelArch:
    """A model's shape: a named shape (SHAPES) or a model's own config."""
    return SHAPES[name] if name in SHAPES else ModelArch.from_model_dir(resolve_model(name))


def _head_of(arch: ModelArch, vocab: int) -> ModelArch:
    """The draft's shape with a head of the frequent tokens a `vocab` subset scores (draft_worker.vocab), when set
    (a request's own rarer tokens are left out: tens to hundreds of rows against tens of thousands)."""
    tokens = subset_tokens(arch, vocab)
    return arch if tokens is None else replace(arch, vocab_size=len(tokens))


def measure_costs(model: str, draft: str, cfg: MeasureConfig, transfer_device: str | None = None) -> CostModel:
    """Measure target, draft (unless n-gram) and transfer on this machine (the transfer on transfer_device,
    default cfg.device)."""
    arch = _arch(model)
    target = measure_model(model, arch, cfg)
    drafter = None if draft == "ngram" else measure_model(draft, _head_of(_arch(draft), cfg.draft_vocab), cfg.draft)
    transfer_device = transfer_device or cfg.device
    transfer = measure_transfer(arch.hidden_size, cfg.rows, device=transfer_device, dtype=cfg.dtype)
    return CostModel(target, drafter, transfer, {**provenance(cfg, f"{model} target, {draft} draft"),
                                                 "transfer_device": transfer_device})


def retime_draft_head(cost: CostModel, draft: str, cfg: MeasureConfig) -> CostModel:
    """`cost` with the draft's head re-timed over the tokens cfg.draft_vocab keeps, at the rows it was timed at (all
    other tables kept): a subset head's effect measured against the same target, draft layers and transfer."""
    if cost.draft is None or Path(cost.draft.name).name != Path(draft).name:
        raise ConfigError(f"the cost model timed the draft {cost.draft.name if cost.draft else 'ngram'}, not {draft}")
    arch = _head_of(_arch(draft), cfg.draft_vocab)
    runner = random_stage(arch, 1, head=True, device=cfg.device, dtype=getattr(torch, cfg.draft.dtype),
                          numerics=cfg.numerics)
    head = measure_head(runner, replace(cfg, rows=tuple(cost.draft.head.rows)))
    note = f"; the draft's head re-timed over {arch.vocab_size} tokens {datetime.date.today()}, the rest as measured"
    return replace(cost, draft=replace(cost.draft, head=head),
                   provenance={**cost.provenance, "draft_vocab": cfg.draft_vocab,
                               "method": cost.provenance["method"] + note})


def costs_main(argv: list[str]) -> int:
    """`specpipe bench costs`: measure a cost model and store it as JSON."""
    from shared.compute.device import default_dtype, resolve_device

    p = argparse.ArgumentParser(prog="specpipe bench costs")
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help=f"a model, or a shape: {', '.join(SHAPES)}")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b", help="a model, a shape, or ngram")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the paper's setting: --model llama-70b "
                   "--draft llama-1b --device cuda)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the target's dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--draft-dtype", choices=DTYPES, default=None, help="the draft's dtype (default: --dtype)")
    p.add_argument("--transfer-device", default=None,
                   help="where the stage-to-stage transfer is timed (default: --device; a bare cuda puts the two "
                        "ranks on GPUs 0 and 1, as NCCL needs: on one GPU give cpu, timed over the CPU link)")
    p.add_argument("--layers", type=int, default=MeasureConfig.layers,
                   help="decoder layers built and timed (per-layer time = total / layers; a stage's share: "
                        "10 for an 80-layer model over 8 stages)")
    p.add_argument("--numerics", choices=NUMERICS, default=MeasureConfig.numerics, help="the kernels timed")
    p.add_argument("--draft-vocab", type=int, default=0, help="the tokens the draft's head scores (0: all)")
    p.add_argument("--from", dest="base", type=Path, default=None,
                   help="with --draft-vocab: keep this cost model's tables and re-time only the draft's head (--draft "
                        "must name its draft; --model, --layers and --transfer-device are not used)")
    p.add_argument("--out", type=Path, default=COSTS / "cpu-qwen2.5-coder.json")
    a = p.parse_args(argv)
    device = resolve_device(a.device)  # ConfigError when it is not there
    transfer_device = a.transfer_device or a.device
    if torch.device(transfer_device).type == "cuda" and torch.cuda.device_count() < 2:
        raise ConfigError(f"timing the transfer on {transfer_device} needs two GPUs (NCCL), this machine has "
                          f"{torch.cuda.device_count()}: pass --transfer-device cpu")
    cfg = replace(MeasureConfig(), device=str(device), dtype=a.dtype or default_dtype(device),
                  draft_dtype=a.draft_dtype, layers=a.layers, numerics=a.numerics,
                  draft_vocab=a.draft_vocab)
    if a.base is not None:
        base = CostModel.load(a.base)
        if base.provenance.get("device") != cfg.device:
            raise ConfigError(f"{a.base.name} was timed on {base.provenance.get('device')}, not {cfg.device}")
        timed = {k: base.provenance[k] for k in ("dtype", "draft_dtype", "numerics") if k in base.provenance}
        cost = retime_draft_head(base, a.draft, replace(cfg, **timed))
    else:
        cost = measure_costs(a.model, a.draft, cfg, transfer_device)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cost.save(a.out)
    print(f"wrote {a.out}")
    return 0


def cost_models(cfg: BenchConfig, log) -> list[CostModel]:
    first = cfg.cost_models[0]
    if not first.exists():
        log(f"measuring the cost model {first.name} (target, draft, transfer) ...")
        first.parent.mkdir(parents=True, exist_ok=True)
        measure_costs(cfg.model, cfg.draft, cfg.measure).save(first)
    costs = [CostModel.load(p) for p in cfg.cost_models if p.exists()]
    for cost, path in zip(costs, cfg.cost_models):
        timed = cost.provenance.get("draft_dtype", cost.provenance["dtype"])  # older files: the target's dtype
        on_cpu = cost.provenance["device"] == "cpu"  # a GPU model is timed in the GPU's dtype (bf16), drafts too
        if cfg.draft != "ngram" and on_cpu and timed != cfg.draft_dtype:
            raise ConfigError(f"cost model {path.name} timed a {timed} draft, but this run drafts in {cfg.draft_dtype}")
    return costs


# ---- sections ---------------------------------------------------------------------------------


def workloads(cfg: BenchConfig) -> list[tbt.Workload]:
    return tbt.workloads_of(cfg.model, cfg.workloads, cfg.prompts_per_workload)


def run_tbt(cfg: BenchConfig, costs: list[CostModel], work: list[tbt.Workload], log) -> dict:
    tcfg = tbt.TbtConfig(cfg.model, cfg.draft, cfg.stages, {s: SAMPLINGS[s] for s in cfg.samplings},
                         cfg.max_new_tokens, cfg.width, cfg.depth, cfg.refill_depth, cfg.runs,
                         cfg.draft_dtype, cfg.sampled_stages)
    rows = tbt.run_all(tcfg, work, log)
    summaries = [tbt.timed_block(rows, c, cfg.width) for c in costs]
    best = max((x for x in summaries[0]["summary"] if x["stages"] == max(cfg.stages)),
               key=lambda x: x["tokens_per_step"]["specpipe"])  # the workload where speculation shows most
    prompt = next(w for w in work if w.name == best["workload"]).prompts[0]
    grids = tbt.occupancy_columns(tcfg, prompt[1], max(cfg.stages), cache=tcfg.runs_dir)
    plots.tbt_plot(summaries[0]["summary"], cfg.results / "tbt.png", f"time between tokens, one request "
                   f"({cfg.model}, cost model: {costs[0].provenance['what']})")
    plots.occupancy_plot(grids, cfg.results / "occupancy.png",
                         f"stage x step occupancy, one request, N={max(cfg.stages)} ({cfg.model})")
    return {"summaries": summaries, "occupancy": f"{best['workload']} prompt {prompt[0]}"}


def run_load(cfg: BenchConfig, costs: list[CostModel], work: list[tbt.Workload], log) -> dict:
    lcfg = LoadModelConfig(cfg.model, cfg.draft, cfg.load_stages, cfg.width, cfg.refill_depth, cfg.load_tokens,
                           cfg.load_requests, cfg.load_concurrency, cfg.load_rate_fractions, cfg.runs,
                           draft_dtype=cfg.draft_dtype)
    prompts = [ids for w in work for _, ids in w.prompts]
    rows = compare(load_all(lcfg, costs[0], prompts, log))
    plots.throughput_plot(rows, cfg.results / "throughput.png",
                          f"many requests, modeled at {cfg.load_stages} stages ({cfg.model})")
    return {"rows": rows, "stages": cfg.load_stages, "requests": cfg.load_requests, "tokens": cfg.load_tokens,
            "cost": costs[0].provenance}


def run_serving(cfg: BenchConfig) -> dict:
    """Sections 1 (real), 2, 3 (real) and 4 on the distributed services (benchmarks/serving.py)."""
    scfg = serving.quick_config() if cfg.quick else serving.full_config()
    return serving.run_all(replace(scfg, log_dir=str(cfg.results / "logs")), progress=True)


def run(cfg: BenchConfig, log=print) -> Path:
    cfg.results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict = {"quick": cfg.quick, "model": cfg.model, "draft": cfg.draft}
    costs = cost_models(cfg, log) if {"tbt", "load"} & set(cfg.sections) else []
    work = workloads(cfg)
    steps = {"tbt": lambda: run_tbt(cfg, costs, work, log), "load": lambda: run_load(cfg, costs, work, log),
             "serving": lambda: run_serving(cfg), "attention": lambda: attention.run(cfg.quick)}
    for name in cfg.sections:
        # tbt and load are assembled from their own cached runs; the other sections are cached whole
        cached = cfg.runs / f"section-{name}.json" if name in ("serving", "attention") else None
        if cached and cached.exists():
            log(f"section {name}: from {cached}")
            results[name] = json.loads(cached.read_text())
            continue
        log(f"section {name} ...")
        results[name] = steps[name]()
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(results[name], default=str))
    results["seconds"] = time.time() - started
    (cfg.results / "results.json").write_text(json.dumps(results, indent=1, default=str))
    path = cfg.out / "BENCHMARKS.md"
    path.write_text(render(results, cfg))
    log(f"wrote {path} in {results['seconds'] / 60:.1f} min")
    return path


def main(argv: list[str]) -> int:
    if argv[:1] == ["attention"]:
        return attention.main(argv[1:])
    if argv[:1] == ["costs"]:
        return costs_main(argv[1:])
    p = argparse.ArgumentParser(prog="specpipe bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: smollm2-135m, short outputs")
    p.add_argument("--out", type=Path, help="BENCHMARKS.md goes here, and the plots and runs too unless OUT is the "
                   "repository (then under benchmarks/results; default: the repository for the full report, "
                   "./bench-quick with --quick)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--resume", action="store_true", help="keep the cached runs (runs/ of the results folder) "
                   "from an interrupted run")
    p.add_argument("--prompts", type=Path, nargs="+", help="JSONL prompt files ('turns' lists) instead of the "
                   "three default workloads")
    p.add_argument("--prompts-per-workload", type=int, help="first K prompts of each file")
    p.add_argument("--stages", type=int, nargs="+", help="stage counts of section 1")
    p.add_argument("--samplings", nargs="+", choices=list(SAMPLINGS), help="section 1's sampling settings")
    p.add_argument("--draft-dtype", choices=DTYPES, default="float32",
                   help="the draft model's dtype in sections 1 and 3, timed with a cost model measured so")
    a = p.parse_args(argv)
    out = a.out or (Path("bench-quick") if a.quick else ROOT)
    cfg = (quick_config if a.quick else full_config)(out)
    cfg = replace(cfg, sections=tuple(s for s in SECTIONS if s in a.sections),
                  workloads=tuple(a.prompts or cfg.workloads),
                  prompts_per_workload=a.prompts_per_workload or cfg.prompts_per_workload,
                  stages=tuple(a.stages or cfg.stages), samplings=tuple(a.samplings or cfg.samplings),
                  sampled_stages=None if a.stages else cfg.sampled_stages)
    if a.draft_dtype != "float32":  # its own cost model: the draft measured in that dtype
        first = cfg.cost_models[0]
        cfg = replace(cfg, draft_dtype=a.draft_dtype, measure=replace(cfg.measure, draft_dtype=a.draft_dtype),
                      cost_models=(first.with_name(f"{first.stem}-draft-{a.draft_dtype}.json"),))
    missing = [w for w in cfg.workloads if not w.exists()]
    if missing:
        raise ConfigError(f"prompt file not found: {missing[0]}")
    if not a.resume and cfg.runs.exists():
        shutil.rmtree(cfg.runs)  # from scratch unless asked; only once the arguments are known to be good
    run(cfg)
    return 0


if __name__ == "__main__":  # `specpipe bench ...` runs this
    import sys

    from shared.types.errors import SpecPipeError

    try:
        raise SystemExit(main(sys.argv[1:]))
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
