"""DistrAttention's accuracy on real models: perplexity on long inputs, and greedy outputs against exact.

    python -m benchmarks.distr_accuracy --model smollm2-135m --settings exact "G=2" "G=2,layers=20-" [--greedy 20]
        [--no-perplexity] [--segments 2] [--segment-len 2048] [--new-tokens 24] [--prompt-tokens 256]
        [--out results.jsonl] [--threads N]

A setting is a comma-separated list of AttentionConfig fields on top of `kind=distr` (G is group_size),
e.g. "G=4,fuse=sum_one,layout=adjacent,layers=0,3-5" (layers last: its list goes on to the end); "exact" is
exact attention.
1. Perplexity: `segments` x `segment_len` tokens of the prompt sets' turns and reference answers
   (benchmarks.attention.corpus_text), each segment one prefill chunk through StageRunner, so every
   layer that the setting names attends with DistrAttention; segments x (segment_len - 1) predictions.
2. Greedy (--greedy N): the first N summarization prompts (sum.jsonl: articles of several hundred tokens),
   each cut to its first --prompt-tokens tokens (default 256: two query blocks of 128) and prefilled in one
   chunk, then `new_tokens` greedy decode steps (decode is always exact); a prompt counts as identical when
   all its new tokens equal exact attention's.
Each result (a setting's perplexity, or its greedy outputs) is one JSON line appended to --out; results already
there with the same parameters are skipped, so runs add up and resume.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

from benchmarks.attention import PROMPTS_DIR, _prefill_nll, corpus_text
from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import load_stage_weights
from shared.model_store import load_tokenizer, resolve_model
from shared.service_args import set_threads
from shared.types.batch import MicroBatch, Row
from shared.types.config import AttentionConfig, ModelArch, SamplingParams
from shared.types.errors import ConfigError, SpecPipeError

GREEDY_SET = "sum.jsonl"


def parse_setting(text: str) -> AttentionConfig:
    """ "exact" or "G=2,fuse=sum_one,layers=4-" -> AttentionConfig (ConfigError on unknown fields)."""
    if text == "exact":
        return AttentionConfig()
    known = {f.name: f.type for f in fields(AttentionConfig)}
    values: dict = {"kind": "distr"}
    key = None
    for item in text.split(","):
        if "=" not in item and key == "layers":  # "layers=0,3-5": the layer list goes on
            values[key] += f",{item}"
            continue
        key, _, value = item.partition("=")
        key = "group_size" if key == "G" else key
        if key not in known or not value:
            raise ConfigError(f"setting '{text}': '{item}' is not field=value ({', '.join(known)}, or G)")
        values[key] = int(value) if known[key] == "int" else value
    return AttentionConfig(**values)


def perplexity(runner: StageRunner, tokens: list[int], segments: int, segment_len: int) -> dict:
    nll, seconds = 0.0, 0.0
    for s in range(segments):
        seg_nll, seg_s = _prefill_nll(runner, tokens[s * segment_len : (s + 1) * segment_len])
        nll, seconds = nll + seg_nll, seconds + seg_s
    predictions = segments * (segment_len - 1)
    return {"perplexity": math.exp(nll / predictions), "predictions": predictions, "prefill_s": seconds}


def greedy_prompts(tokenizer, count: int, tokens: int) -> list[list[int]]:
    lines = (PROMPTS_DIR / GREEDY_SET).read_text().splitlines()
    prompts = [tokenizer.encode(json.loads(line)["turns"][0])[:tokens] for line in lines[:count]]
    if len(prompts) < count or min(map(len, prompts)) < tokens:
        raise SpecPipeError(f"{GREEDY_SET} has fewer than {count} prompts of {tokens} tokens")
    return prompts


def greedy(runner: StageRunner, prompt: list[int], new_tokens: int) -> list[int]:
    """The prompt as one prefill chunk, then greedy decode steps of one row each. -> the new tokens."""
    runner.add_request("g", RequestInfo(len(prompt), SamplingParams()), len(prompt) + new_tokens)
    rows = [Row("g", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(prompt)]
    out: list[int] = []
    while len(out) < new_tokens:
        hidden = runner.hidden(MicroBatch(len(out), rows))  # [rows, H]
        out.append(int(runner.logits(hidden[-1:]).argmax(-1)))
        p = len(prompt) + len(out) - 1
        rows = [Row("g", -(p + 2), -(p + 1), p, out[-1], True, False)]
    runner.release("g")
    return out


class LoadedModel:
    """A model's weights, tokenizer and corpus tokens, loaded once for all settings."""

    def __init__(self, model: str):
        model_dir = resolve_model(model)
        self.name, self.arch = model, ModelArch.from_model_dir(model_dir)
        self.weights = load_stage_weights(model_dir, self.arch, 0, self.arch.num_layers)
        self.tokenizer = load_tokenizer(model_dir)
        self.tokens = self.tokenizer.encode(corpus_text())


def run_setting(model: LoadedModel, setting: str, args: argparse.Namespace, parts: list[str],
                exact_greedy: list[list[int]] | None) -> list[dict]:
    """The parts ("perplexity", "greedy") of one setting, one result each."""
    if len(model.tokens) < args.segments * args.segment_len:
        raise SpecPipeError(f"the prompt sets hold {len(model.tokens)} tokens, fewer than {args.segments} x "
                            f"{args.segment_len}")
    runner = StageRunner(model.arch, model.weights, parse_setting(setting))
    head = {"model": model.name, "setting": setting}
    results = []
    if "perplexity" in parts:
        results.append({**head, "kind": "perplexity", "segments": args.segments, "segment_len": args.segment_len,
                        **perplexity(runner, model.tokens, args.segments, args.segment_len)})
    if "greedy" in parts:
        start = time.perf_counter()
        prompts = greedy_prompts(model.tokenizer, args.greedy, args.prompt_tokens)
        outputs = [greedy(runner, p, args.new_tokens) for p in prompts]
        result = {**head, "kind": "greedy", "prompts": args.greedy, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "greedy": outputs, "greedy_s": time.perf_counter() - start}
        if exact_greedy is not None:
            result["greedy_identical"] = sum(a == b for a, b in zip(outputs, exact_greedy)) / len(outputs)
        results.append(result)
    return results


def _done(path: Path | None, args: argparse.Namespace) -> list[dict]:
    """Earlier results of this model with the same measurement parameters."""
    if path is None or not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    same = {"perplexity": ("segments", "segment_len"), "greedy": ("prompts", "prompt_tokens", "new_tokens")}
    wanted = {"segments": args.segments, "segment_len": args.segment_len, "prompts": args.greedy,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    return [r for r in rows if r["model"] == args.model
            and all(r.get(key) == wanted[key] for key in same[r.get("kind", "perplexity")])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distr_accuracy")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", nargs="+", default=["exact", "G=2", "G=4"])
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--no-perplexity", action="store_true", help="greedy outputs only")
    p.add_argument("--greedy", type=int, default=0, help="greedy outputs of this many prompts against exact's")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=256, help="greedy: each prompt cut to this many tokens")
    p.add_argument("--out", type=Path, help="append one JSON line per result; results already there are skipped")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    done = _done(args.out, args)
    exact = next((r["greedy"] for r in done if r["setting"] == "exact" and r.get("kind") == "greedy"), None)
    wanted = ([] if args.no_perplexity else ["perplexity"]) + (["greedy"] if args.greedy else [])
    todo = {s: [k for k in wanted if not any(r["setting"] == s and r.get("kind", "perplexity") == k for r in done)]
            for s in args.settings}
    try:
        model = LoadedModel(args.model) if any(todo.values()) else None
        for setting, parts in todo.items():
            for result in run_setting(model, setting, args, parts, exact) if parts else []:
                if setting == "exact" and result["kind"] == "greedy":
                    exact = result["greedy"]
                print(json.dumps({k: v for k, v in result.items() if k != "greedy"}), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
