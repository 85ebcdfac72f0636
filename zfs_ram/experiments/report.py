"""Render an experiment: the summary table, the JSON file of every sample, the PNG plot.

Only renders; the numbers come from runner.RunResult. matplotlib is imported inside
``write_plot`` so the rest works without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from zfs_ram.experiments.runner import STAGES, ExperimentResult, RunResult

MIB = 1 << 20


@dataclass(frozen=True)
class RunSummary:
    """The figures of one run that the table shows."""

    arm: str
    fraction: float
    compr_fill: int  # compressed bytes stored after the fill
    compr_freed: float | None  # share of compr_fill the delete freed
    ratio: dict[str, float | None]  # mem_used_total / compr_data_size per stage
    freed_share: dict[str, float | None]  # memory freed / compressed bytes freed (wait, compact)
    compact_ms: float | None
    pages_compacted: int  # by the whole run (background + explicit)
    rss: dict[str, int | None]  # holder's RSS per stage (None for the kernel)
    clean: bool
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "fraction": self.fraction,
            "compr_fill": self.compr_fill,
            "compr_freed": self.compr_freed,
            "ratio": self.ratio,
            "freed_share": self.freed_share,
            "compact_ms": self.compact_ms,
            "pages_compacted": self.pages_compacted,
            "rss": self.rss,
            "clean": self.clean,
            "error": self.error,
        }


def _ratio(mem: int, compr: int) -> float | None:
    return mem / compr if compr > 0 else None


def summarize(run: RunResult) -> RunSummary:
    """Ratios per stage and the share of freed compressed bytes that memory followed."""
    st = run.stages
    ratio = {s: _ratio(st[s].mm.mem_used_total, st[s].mm.compr_data_size) for s in st}
    freed: dict[str, float | None] = {}
    fill = st.get("fill")
    for s in ("wait", "compact"):
        if fill is None or s not in st:
            freed[s] = None
            continue
        compr_bytes_freed = fill.mm.compr_data_size - st[s].mm.compr_data_size
        mem_freed = fill.mm.mem_used_total - st[s].mm.mem_used_total
        freed[s] = mem_freed / compr_bytes_freed if compr_bytes_freed > 0 else None
    secs = run.stage_seconds.get("compact")
    first = st.get("fill")
    last = st.get("compact")
    compacted = last.mm.pages_compacted - first.mm.pages_compacted if first and last else 0
    deleted = st.get("delete")
    compr_freed: float | None = None
    if fill and deleted and fill.mm.compr_data_size > 0:
        compr_freed = 1 - deleted.mm.compr_data_size / fill.mm.compr_data_size
    return RunSummary(
        arm=run.arm,
        fraction=run.fraction,
        compr_fill=fill.mm.compr_data_size if fill else 0,
        compr_freed=compr_freed,
        ratio=ratio,
        freed_share=freed,
        compact_ms=secs * 1000 if secs is not None else None,
        pages_compacted=compacted,
        rss={s: st[s].rss for s in st},
        clean=run.clean,
        error=run.error,
    )


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rss(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


TABLE_HEADER = (
    "arm",
    "del%",
    "compr MiB",
    "compr freed%",
    "mem/compr fill",
    "delete",
    "wait",
    "compact",
    "freed/compr-freed wait",
    "compact",
    "compact ms",
    "RSS MiB fill/wait/compact",
)


def table_rows(result: ExperimentResult) -> list[tuple[str, ...]]:
    """One row of strings per run, in TABLE_HEADER's order."""
    rows: list[tuple[str, ...]] = []
    for run in result.runs:
        s = summarize(run)
        arm = s.arm + ("" if s.clean else " *")
        if s.error is not None:
            rows.append((arm, f"{s.fraction * 100:.0f}", "FAILED") + ("-",) * 9)
            continue
        rows.append(
            (
                arm,
                f"{s.fraction * 100:.0f}",
                f"{s.compr_fill / MIB:.1f}",
                _f(None if s.compr_freed is None else s.compr_freed * 100, ".0f"),
                *(_f(s.ratio.get(stage), ".3f") for stage in STAGES),
                _f(s.freed_share["wait"], ".2f"),
                _f(s.freed_share["compact"], ".2f"),
                _f(s.compact_ms, ".1f"),
                "/".join(_rss(s.rss.get(stage)) for stage in ("fill", "wait", "compact"))
                if any(v is not None for v in s.rss.values())
                else "-",
            )
        )
    return rows


def render_table(result: ExperimentResult, markdown: bool = False) -> str:
    """The summary table: aligned plain text, or a Markdown table for the README."""
    rows = [TABLE_HEADER, *table_rows(result)]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(TABLE_HEADER))
        text = "\n".join(lines)
    else:
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(TABLE_HEADER))]
        text = "\n".join(
            "  ".join(
                cell.rjust(widths[i]) if i else cell.ljust(widths[i]) for i, cell in enumerate(r)
            ).rstrip()
            for r in rows
        )
    notes = [
        "del%: share of the files deleted; compr freed%: share of the compressed bytes freed.",
        "mem/compr: mem_used_total / compr_data_size after each stage (1.0 = no waste).",
        "freed/compr-freed: memory freed since the fill / compressed bytes freed "
        "(1.0 = deleting gives back all it should).",
    ]
    if any(not r.clean for r in result.runs):
        notes.append("*: a shrinker or reclaim ran during the run (it compacts zram pools).")
    for run in result.runs:
        for error in run.failed_attempts:
            notes.append(f"retried {run.arm} at {run.fraction:.0%} after: {error}")
        if run.error is not None:
            notes.append(f"FAILED {run.arm} at {run.fraction:.0%}: {run.error}")
    for arm, why in result.skipped.items():
        notes.append(f"{arm}: skipped ({why}).")
    return text + "\n\n" + "\n".join(notes) + "\n"


def write_json(result: ExperimentResult, path: str) -> None:
    """Every parameter, stage sample, timeline sample and summary, as one JSON document."""
    doc = result.as_dict()
    doc["summary"] = [summarize(r).as_dict() for r in result.runs]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_plot(result: ExperimentResult, path: str) -> None:
    """Memory used over each run, one panel per arm, one line per delete fraction.

    Solid: mem_used_total; dashed: compr_data_size; dotted: the daemon's RSS (zfs_ram arms);
    dots mark the stage samples.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r.arm for r in result.runs))
    if not arms:
        return
    fig, axes = plt.subplots(len(arms), 1, figsize=(9, 2.8 * len(arms)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, arm in zip(axes[:, 0], arms, strict=True):
        runs = [r for r in result.runs if r.arm == arm and r.timeline]
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            t = [s.t for s in run.timeline]
            ax.plot(
                t,
                [s.mm.mem_used_total / MIB for s in run.timeline],
                color=color,
                label=f"delete {run.fraction:.0%}: mem_used",
            )
            ax.plot(
                t,
                [s.mm.compr_data_size / MIB for s in run.timeline],
                color=color,
                linestyle="--",
                linewidth=0.8,
            )
            rss = [(s.t, s.rss / MIB) for s in run.timeline if s.rss is not None]
            if rss:
                ax.plot(
                    [t for t, _ in rss],
                    [r for _, r in rss],
                    color=color,
                    linestyle=":",
                    linewidth=0.8,
                )
            stages = [run.stages[s] for s in STAGES if s in run.stages]
            ax.plot(
                [s.t for s in stages],
                [s.mm.mem_used_total / MIB for s in stages],
                "o",
                color=color,
                markersize=3,
            )
        failed = [f"{r.fraction:.0%}" for r in result.runs if r.arm == arm and r.error]
        ax.set_title(arm + (f" (failed: {', '.join(failed)})" if failed else ""))
        ax.set_ylabel("MiB")
        ax.grid(True, alpha=0.3)
        if runs:
            ax.legend(fontsize="small", loc="upper right")
    axes[-1, 0].set_xlabel(
        "seconds since mount (dashed: compr_data_size; dotted: daemon RSS; dots: stage ends)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
