"""Markdown for BENCHMARKS.md from benchmarks.serving's results (one run, numbers side by side).

`markdown(results)` renders every section present in `serving.run_all`'s dict; `section_1` .. `section_4`
render one section's dict each.
"""

from __future__ import annotations

import os


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.0f} ms" if v >= 1 else f"{v * 1000:.1f} ms"


def _dist(d: dict) -> str:
    return "n/a" if not d or d.get("n", 0) == 0 else f"{_ms(d['mean'])} / {_ms(d['p50'])} / {_ms(d['p99'])}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f} MiB"


def _error(d: dict) -> list[str]:
    return [f"**ERROR: {d['error']}**", ""] if d.get("error") else []


def _prompts(d: dict) -> str:
    files = sorted({p["file"] for p in d["prompts"]})
    lengths = [p["prompt_tokens"] for p in d["prompts"]]
    span = f"{min(lengths)}-{max(lengths)} prompt tokens" if lengths else "no prompts"
    return f"{len(d['prompts'])} prompts ({', '.join(files)}; first turn through the chat template; {span})"


def _mismatches(d: dict, what: str) -> list[str]:
    if d.get("identical"):
        return [f"Outputs identical, token for token: **yes** ({what})."]
    lines = [f"**Outputs NOT identical** ({what}):"]
    lines += [f"- {m.get('run', m.get('request'))}: prompt {m['prompt']} differs from token {m['first_diff']}"
              + (f" (lengths {m['tokens'][0]} vs {m['tokens'][1]})" if "tokens" in m else "") for m in d["mismatches"]]
    return lines if d["mismatches"] else ["**Outputs could not be compared** (a run is missing)."]


def _shared_cores(d: dict, pol: dict, speed: float) -> list[str]:
    """When the stage processes and the scheduler (its n-gram draft) share fewer cores than they number, say what
    that does."""
    cores = os.cpu_count() or 1
    compute = d["stages"] + 1  # the stage processes and the scheduler, which drafts
    if cores >= compute:
        return []
    steps = {p: pol[p]["cluster"]["wire"]["mean_step_ms"] for p in ("pp", "specpipe")
             if "wire" in pol[p].get("cluster", {})}
    per_step = (f" (a specpipe step took {steps['specpipe']:.0f} ms against pp's {steps['pp']:.0f} ms)"
                if len(steps) == 2 else "")
    outcome = ("fewer steps still buy wall-clock time here, less than they would with a device per stage"
               if speed > 1 else "here, fewer steps do not buy wall-clock time")
    return ["", f"This machine has {cores} cores for {d['stages']} stage processes and the scheduler: when "
            f"specpipe fills the pipeline, its stages and the scheduler's drafting compete for the same "
            f"cores{per_step}, while pp leaves one stage idle each step. So {outcome}; tokens per step is what "
            "carries over to a pipeline with a device per stage, and the modeled section times it that way."]


def section_1(d: dict) -> str:
    pol = d["policies"]
    threads = next((v["cluster"]["threads"] for v in pol.values()), "?")
    lines = [
        "### 1. One request at a time through the distributed services",
        "",
        f"{d['model']} (draft `{d['draft']}` in {d.get('draft_dtype', 'float32')} for specpipe), "
        f"{d['stages']} stage processes (linked over TCP; "
        f"{threads} torch thread(s) each), width {d['width']}, greedy, up to {d['max_new_tokens']} new tokens, "
        f"{_prompts(d)}; machine: {d['machine']}.",
        "",
        "Measured at the Redis queue, not through HTTP: the benchmark XADDs the `RequestMsg` itself and "
        "timestamps every `TokensMsg` as its XREAD returns (tokens arriving together count at that time). "
        "TTFT = first token - submit; TBT per request = (last token - first token) / (tokens - 1); gaps = "
        "every interval between consecutive tokens. Each policy ran on its own fresh cluster after one untimed "
        "warm-up request.",
        "",
        *_error(d),
        "| policy | tokens | TTFT mean / p50 / p99 | TBT per request mean / p50 / p99 | inter-token gap mean / "
        "p50 / p99 | tokens/s | tokens / step (all) | tokens / step (decode) | accepted draft tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in pol.items():
        lines.append(f"| {name} | {v['tokens']} | {_dist(v['ttft_s'])} | {_dist(v['tbt_s'])} | {_dist(v['gap_s'])} | "
                     f"{_num(v['tokens_per_s'], '.1f')} | {_num(v['tokens_per_step'], '.3f')} | "
                     f"{_num(v['decode_tokens_per_step'], '.3f')} | {_num(v['accepted'], 'd')} |")
    if "pp" in pol and "specpipe" in pol and pol["pp"]["tbt_s"]["n"] and pol["specpipe"]["tbt_s"]["n"]:
        speed = pol["pp"]["tbt_s"]["mean"] / pol["specpipe"]["tbt_s"]["mean"]
        lines += ["", f"Mean TBT, pp's over specpipe's: **{speed:.2f}x** (same prompts; above 1: specpipe is faster)."]
        lines += _shared_cores(d, pol, speed)
    lines += ["", "tokens / step (all) counts every pipeline step of the run, prefill included; (decode) counts "
              "(tokens - 1) over the steps between each request's first and last token.", ""]
    for name, v in pol.items():
        if v["failed"]:
            lines += [f"**{v['failed']} {name} requests failed**: {'; '.join(v['errors'])}", ""]
    return "\n".join([*lines, *_mismatches(d, "pp vs specpipe, every prompt")]) + "\n"


RUN_NAMES = {"hf_generate": "transformers `generate()`, target alone",
             "hf_assisted": "transformers assisted generation",
             "services_pp": "SpecPipe services, pp", "services_specpipe": "SpecPipe services, specpipe"}


def _run_name(key: str, run: dict, d: dict) -> str:
    if key == "hf_assisted":
        note = " (the target itself: a stand-in, no small draft model in this setting)" \
            if d["assistant_is_target"] else ""
        return f"{RUN_NAMES[key]} (`assistant_model` = {run['assistant']}){note}"
    if key.startswith("inprocess_"):
        return f"SpecPipe in-process executor, specpipe, {run['stages']} logical stages in one process"
    if key.startswith("services_"):
        return f"{RUN_NAMES[key]}, {run['stages']} stage processes"
    return RUN_NAMES.get(key, key)


def section_2(d: dict) -> str:
    runs = d["runs"]
    base = runs.get("hf_generate", {}).get("tokens_per_s")
    bad = {m["run"] for m in d["mismatches"]}
    lines = [
        "### 2. Against what a user would run instead (Hugging Face transformers)",
        "",
        f"Target {d['model']}, SpecPipe draft `{d['draft']}`, assistant `{d['assistant']}`, greedy "
        f"(`do_sample=False`), fp32, up to {d['max_new_tokens']} new tokens, stopping at the model's EOS ids, "
        f"{_prompts(d)}, one "
        f"request at a time; machine: {d['machine']}. Wall clock per prompt (prefill included, model loading "
        "excluded); transformers and the in-process executor run in the benchmark process, the services rows "
        f"are section 1's run (timed at the Redis queue; its draft worker in {d.get('draft_dtype', 'float32')}, the "
        "target in fp32 everywhere).",
        "",
        *_error(d),
        "| run | torch threads | tokens | wall time | tokens/s | vs `generate()` | same tokens as `generate()` |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, run in runs.items():
        tps = run.get("tokens_per_s")
        vs = f"{tps / base:.2f}x" if tps and base else "n/a"
        threads = run.get("threads")
        threads = f"{threads} per process" if key.startswith("services_") else threads
        same = "reference" if key == "hf_generate" else ("**NO**" if key in bad else "yes")
        lines.append(f"| {_run_name(key, run, d)} | {threads} | {run['tokens']} | {run['total_s']:.1f} s | "
                     f"{_num(tps, '.2f')} | {vs} | {same} |")
    lines += [""]
    return "\n".join([*lines, *_mismatches(d, "every run against `generate()`, every prompt")]) + "\n"


def section_3(d: dict, single_model: str | None = None) -> str:
    note = (f" ({d['model']} rather than {single_model}, so that the sweep stays tractable on this machine)"
            if single_model and single_model != d["model"] else "")
    lines = [
        "### 3. Under load: SpecPipe-DB dynamic batching vs plain PP with continuous batching",
        "",
        f"{d['model']}{note}, draft `{d['draft']}`, {d['stages']} stage processes, width {d['width']}, greedy, "
        f"{d['max_new_tokens']} new tokens per request, {_prompts(d)} cycled; machine: {d['machine']}. Measured "
        "at the Redis queue (no HTTP). Closed loop: `concurrency` requests open at all times; open loop: Poisson "
        "arrivals at `rate` requests/s (seeded). tokens/s = output tokens / (last token - first submit); "
        "tokens / step = output tokens / pipeline steps in that window.",
        "",
        *_error(d),
        "| load | policy | requests | tokens | tokens / step | tokens/s | TTFT mean / p50 / p99 | "
        "TBT mean / p50 / p99 | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    points = sorted(d["points"], key=lambda p: (p["mode"] != "concurrency", p["value"], p["policy"]))
    for p in points:
        load = f"concurrency {p['value']}" if p["mode"] == "concurrency" else f"Poisson {p['value']:g} req/s"
        lines.append(f"| {load} | {p['policy']} | {p['requests']} | {p['tokens']} | "
                     f"{_num(p['tokens_per_step'], '.3f')} | {_num(p['tokens_per_s'], '.1f')} | "
                     f"{_dist(p['ttft_s'])} | {_dist(p['tbt_s'])} | {p['failed']} |")
    ll = d["lossless"]
    lines += [""]
    if ll.get("identical"):
        lines.append(f"Lossless under batching: **all {ll['checked']} requests** equal {ll['reference']}.")
    else:
        lines.append(f"**Lossless check FAILED**: {ll.get('mismatch_count', '?')} of {ll.get('checked', 0)} requests "
                     f"differ from {ll.get('reference', 'the reference')}:")
        lines += [f"- {m['request']} (prompt {m['prompt']}) differs from token {m['first_diff']}"
                  for m in ll.get("mismatches", [])]
    return "\n".join(lines) + "\n"


def section_4(d: dict) -> str:
    lines = [
        "### 4. Resources",
        "",
        f"Peak resident memory (VmHWM from /proc/<pid>/status, read just before the cluster stopped) of every "
        f"process of the clusters above, beside the fp32 weight bytes the stage loads (its layers; the embedding "
        f"on the first stage; the final norm and the head on the last, a tied head being a second copy of the "
        f"embedding) and model size / N; machine: {d['machine']}.",
        "",
        *_error(d),
        "| cluster | model | process | peak RSS | stage weights | model size / N | RSS - weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in d["rows"]:
        for proc, rss in row["peak_rss_bytes"].items():
            k = int(proc.split("-")[1]) if proc.startswith("stage-") else None
            w = row["stage_weight_bytes"][k] if k is not None else None
            extra = _mib(rss - w) if rss is not None and w is not None else ""
            lines.append(f"| {row['run']} | {row['model']} | {proc} | {_mib(rss)} | {_mib(w) if w else '-'} | "
                         f"{_mib(row['model_bytes_over_n']) if k is not None else '-'} | {extra} |")
    lines += [
        "",
        "Per pipeline step over each whole run (warm-up excluded; benchmarks/wire_overhead.py's split, from every "
        "process's intervals on the host's monotonic clock; the parts add up to the step): compute = some stage is "
        "computing; scheduler = its own work while no stage computes; draft wait = waiting for proposals while no "
        "stage computes; wire = the rest (control path, msgpack, link send/recv, stages applying events).",
        "",
        "| cluster | steps | step mean | compute | scheduler | draft wait | wire (mean / p50) | wire share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in d["rows"]:
        w = row["wire"]
        if not w.get("steps"):
            lines.append(f"| {row['run']} | 0 | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        lines.append(f"| {row['run']} | {w['steps']} | {w['mean_step_ms']:.1f} ms | {w['mean_compute_ms']:.1f} ms "
                     f"({w['compute_share']:.1%}) | {w['mean_scheduler_ms']:.1f} ms ({w['scheduler_share']:.1%}) | "
                     f"{w['mean_draft_wait_ms']:.1f} ms ({w['draft_wait_share']:.1%}) | "
                     f"{w['mean_wire_ms']:.1f} / {w['p50_wire_ms']:.1f} ms | **{w['wire_share']:.1%}** |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    """Every section present in `benchmarks.serving.run_all`'s results."""
    parts = []
    if "single_request" in results:
        parts.append(section_1(results["single_request"]))
    if "hf_baseline" in results:
        parts.append(section_2(results["hf_baseline"]))
    if "load" in results:
        parts.append(section_3(results["load"], results.get("single_request", {}).get("model")))
    if "resources" in results:
        parts.append(section_4(results["resources"]))
    if "elapsed_s" in results:
        parts.append(f"_All sections above: one run of `python -m benchmarks.serving`, {results['elapsed_s'] / 60:.1f} "
                     f"min in all, started {results.get('started', '?')}._\n")
    if "updated" in results:
        u = results["updated"]
        parts.append(f"_Updated {u['started']} (`python -m benchmarks.serving --update`): {u['note']}._\n")
    return "\n".join(parts)
