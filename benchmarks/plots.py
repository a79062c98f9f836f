"""The report's PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.tbt import POLICIES  # noqa: E402

COLORS = {"pp": "#8c8c8c", "tree": "#4c72b0", "specpipe": "#dd8452"}


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tbt_plot(summary: list[dict], path: Path, title: str) -> None:
    """TBT per policy (bars) for each stage count, one panel per workload/sampling."""
    panels = sorted({(s["workload"], s["sampling"]) for s in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (workload, sampling) in zip(axes[0], panels):
        rows = sorted((s for s in summary if (s["workload"], s["sampling"]) == (workload, sampling)),
                      key=lambda s: s["stages"])
        for i, policy in enumerate(POLICIES):
            xs = [j + (i - 1) * 0.27 for j in range(len(rows))]
            ax.bar(xs, [1000 * s["tbt_s"][policy] for s in rows], 0.27, label=policy, color=COLORS[policy])
        ax.set_xticks(range(len(rows)), [f"N={s['stages']}" for s in rows])
        ax.set_title(f"{workload} ({sampling})", fontsize=10)
        ax.set_ylabel("time between tokens (ms)")
    axes[0][0].legend(fontsize=8)
    _save(fig, path, title)


def throughput_plot(rows: list[dict], path: Path, title: str) -> None:
    """Throughput and mean TBT against concurrency, pp vs specpipe."""
    closed = sorted((r for r in rows if r["concurrency"]), key=lambda r: r["concurrency"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = [r["concurrency"] for r in closed]
    for policy in ("pp", "specpipe"):
        a.plot(xs, [r["throughput"][policy] for r in closed], "o-", label=policy, color=COLORS[policy])
        b.plot(xs, [1000 * (r["tbt_mean"][policy] or 0) for r in closed], "o-", label=policy, color=COLORS[policy])
    for ax, label in ((a, "output tokens / s"), (b, "mean time between tokens (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
    a.legend(fontsize=8)
    _save(fig, path, title)


def occupancy_plot(grids: dict[str, list[dict]], path: Path, title: str) -> None:
    """Stage x step grids (pp above specpipe): green = useful rows, red = pruned, white = idle stage."""
    fig, axes = plt.subplots(len(grids), 1, figsize=(10, 1.2 + 0.35 * 2 * len(next(iter(grids.values()))[0]["stages"])),
                             squeeze=False)
    for ax, (policy, columns) in zip(axes[:, 0], grids.items()):
        stages = len(columns[0]["stages"]) if columns else 0
        for x, col in enumerate(columns):
            for s, cells in enumerate(col["stages"]):
                useful = sum(c[1] for c in cells)
                wasted = sum(c[2] for c in cells)
                if useful + wasted == 0:
                    continue
                frac = useful / (useful + wasted)
                ax.add_patch(plt.Rectangle((x, s), 1, frac, color="#55a868"))
                ax.add_patch(plt.Rectangle((x, s + frac), 1, 1 - frac, color="#c44e52"))
                ax.text(x + 0.5, s + 0.5, str(useful + wasted), ha="center", va="center", fontsize=6)
        ax.set_xlim(0, len(columns))
        ax.set_ylim(stages, 0)
        ax.set_yticks([s + 0.5 for s in range(stages)], [f"stage {s}" for s in range(stages)], fontsize=7)
        ax.set_xticks([])
        busy = sum(bool(cells) for c in columns for cells in c["stages"])
        ax.set_title(f"{policy}: {busy} of {stages * len(columns)} stage-steps busy (numbers: rows computed; "
                     "green useful, red pruned, white idle)", fontsize=8)
    _save(fig, path, title)
