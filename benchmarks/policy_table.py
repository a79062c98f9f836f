"""Compare `specpipe simulate --json` runs of several policies on the same prompts.

    python -m benchmarks.policy_table pp.json tree.json specpipe.json

Prints a markdown table (tokens per step, speedup in steps over pp, accepted
tokens, misses) and checks that every policy produced exactly the same tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(reports: list[dict]) -> str:
    base = next((r for r in reports if r["policy"] == "pp"), None)
    lines = [
        "| policy | stages | width | prompts | new tokens | steps | tokens/step | vs pp (steps) | accepted | misses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        steps = sum(x["steps"] for x in r["results"])
        tokens = sum(x["new_tokens"] for x in r["results"])
        accepted = sum(x.get("accepted", 0) for x in r["results"])
        misses = sum(x.get("bonus", 0) for x in r["results"]) - len(r["results"])  # the first token is no miss
        speed = f"{base['tokens_per_step'] and r['tokens_per_step'] / base['tokens_per_step']:.2f}x" if base else "-"
        width = r.get("width", "") if r["policy"] != "pp" else "-"
        lines.append(f"| {r['policy']} | {r['stages']} | {width} | {len(r['results'])} | {tokens} | {steps} | "
                     f"{r['tokens_per_step']:.3f} | {speed} | {accepted} | {misses} |")
    return "\n".join(lines)


def identical(reports: list[dict]) -> bool:
    outputs = [[x["output_ids"] for x in r["results"]] for r in reports]
    return all(o == outputs[0] for o in outputs)


def main(paths: list[str]) -> int:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    print(table(reports))
    same = identical(reports)
    print(f"\noutputs identical across policies: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
