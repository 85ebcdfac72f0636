"""Render an experiment: the summary table, the JSON file of every sample, the PNG plot.

Only renders; the numbers come from runner.RunResult. matplotlib is imported inside
``build_figure`` so the rest works without it. The byte ratios ("x lz4") compare each run with
the run of ``params["reference_arm"]`` (an lz4 arm without steps after the fill, chosen by the
CLI) at the same fraction: the fill stores the same data on every arm.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zfs_ram.experiments.runner import STAGES, TIER, ExperimentResult, RunResult, Sample

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MIB = 1 << 20


@dataclass(frozen=True)
class RunSummary:
    """The figures of one run that the table shows."""

    arm: str
    fraction: float
    compr_fill: int  # compressed bytes stored after the fill
    compr_stored: int  # ... and once the arm's steps after the fill are done (= fill without)
    mem_stored: int  # mem_used_total at that point
    compr_vs_reference: float | None  # compr_stored / the reference arm's
    mem_vs_reference: float | None  # mem_stored / the reference arm's
    compr_freed: float | None  # share of compr_stored the delete freed
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
            "compr_stored": self.compr_stored,
            "mem_stored": self.mem_stored,
            "compr_vs_reference": self.compr_vs_reference,
            "mem_vs_reference": self.mem_vs_reference,
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


def stored_sample(run: RunResult) -> Sample | None:
    """The last sample before the delete: after the arm's steps if it has any, else the fill."""
    return run.stages.get(TIER) or run.stages.get("fill")


def summarize(run: RunResult, reference: RunResult | None = None) -> RunSummary:
    """Ratios per stage, the share of freed compressed bytes that memory followed, and the
    bytes stored beside ``reference``'s (None: no ratio)."""
    st = run.stages
    ratio = {s: _ratio(st[s].mm.mem_used_total, st[s].mm.compr_data_size) for s in st}
    stored = stored_sample(run)
    freed: dict[str, float | None] = {}
    for s in ("wait", "compact"):
        if stored is None or s not in st:
            freed[s] = None
            continue
        compr_bytes_freed = stored.mm.compr_data_size - st[s].mm.compr_data_size
        mem_freed = stored.mm.mem_used_total - st[s].mm.mem_used_total
        freed[s] = mem_freed / compr_bytes_freed if compr_bytes_freed > 0 else None
    secs = run.stage_seconds.get("compact")
    first = st.get("fill")
    last = st.get("compact")
    compacted = last.mm.pages_compacted - first.mm.pages_compacted if first and last else 0
    deleted = st.get("delete")
    compr_freed: float | None = None
    if stored and deleted and stored.mm.compr_data_size > 0:
        compr_freed = 1 - deleted.mm.compr_data_size / stored.mm.compr_data_size
    ref = stored_sample(reference) if reference is not None else None
    compr_vs = mem_vs = None
    if stored is not None and ref is not None:
        compr_vs = _ratio(stored.mm.compr_data_size, ref.mm.compr_data_size)
        mem_vs = _ratio(stored.mm.mem_used_total, ref.mm.mem_used_total)
    return RunSummary(
        arm=run.arm,
        fraction=run.fraction,
        compr_fill=first.mm.compr_data_size if first else 0,
        compr_stored=stored.mm.compr_data_size if stored else 0,
        mem_stored=stored.mm.mem_used_total if stored else 0,
        compr_vs_reference=compr_vs,
        mem_vs_reference=mem_vs,
        compr_freed=compr_freed,
        ratio=ratio,
        freed_share=freed,
        compact_ms=secs * 1000 if secs is not None else None,
        pages_compacted=compacted,
        rss={s: st[s].rss for s in st},
        clean=run.clean,
        error=run.error,
    )


def reference_runs(result: ExperimentResult) -> dict[float, RunResult]:
    """The reference arm's runs that got past the fill, by fraction."""
    name = result.params.get("reference_arm")
    return {r.fraction: r for r in result.runs if r.arm == name and stored_sample(r) is not None}


def summaries(result: ExperimentResult) -> list[RunSummary]:
    """summarize() for every run, each against the reference run of its fraction (or, if that
    one failed, of any fraction: the data stored before the delete is the same)."""
    refs = reference_runs(result)
    fallback = next(iter(refs.values()), None)
    return [summarize(r, refs.get(r.fraction, fallback)) for r in result.runs]


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rss(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


TABLE_HEADER = (
    "arm",
    "del%",
    "compr MiB",
    "x lz4",
    "mem x lz4",
    "compr freed%",
    "mem/compr fill",
    TIER,
    "delete",
    "wait",
    "compact",
    "freed/compr-freed wait",
    "compact",
    "compact ms",
    "RSS MiB fill/wait/compact",
)
# Marks a run the experiment's interruption stopped half-way (its finished stages are shown).
STOPPED_MARK = " (stopped)"


def table_rows(result: ExperimentResult) -> list[tuple[str, ...]]:
    """One row of strings per run, in TABLE_HEADER's order."""
    rows: list[tuple[str, ...]] = []
    for run, s in zip(result.runs, summaries(result), strict=True):
        arm = s.arm + ("" if s.clean else " *")
        if s.error is not None and not run.stages:
            rows.append((arm, f"{s.fraction * 100:.0f}", "FAILED") + ("-",) * 12)
            continue
        if s.error is not None:
            arm += STOPPED_MARK
        rows.append(
            (
                arm,
                f"{s.fraction * 100:.0f}",
                f"{s.compr_stored / MIB:.1f}",
                _f(s.compr_vs_reference, ".3f"),
                _f(s.mem_vs_reference, ".3f"),
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
    reference = result.params.get("reference_arm")
    notes = [
        "del%: share of the files deleted; compr MiB: compressed bytes stored before the delete"
        " (after the tier steps, if any); compr freed%: share of them the delete freed.",
        f"x lz4, mem x lz4: compr_data_size, mem_used_total before the delete / {reference}'s"
        if reference
        else "x lz4: no plain lz4 arm in this run to compare with.",
        "mem/compr: mem_used_total / compr_data_size after each stage (1.0 = no waste);"
        f" {TIER}: after the arm's steps after the fill (- for arms without).",
        "freed/compr-freed: memory freed since the delete began / compressed bytes freed "
        "(1.0 = deleting gives back all it should).",
    ]
    if any(not r.clean for r in result.runs):
        notes.append("*: a shrinker or reclaim ran during the run (it compacts zram pools).")
    for run in result.runs:
        for error in run.failed_attempts:
            notes.append(f"retried {run.arm} at {run.fraction:.0%} after: {error}")
        if run.error is not None:
            what = "STOPPED" if run.stages else "FAILED"
            notes.append(f"{what} {run.arm} at {run.fraction:.0%}: {run.error}")
    for arm, why in result.skipped.items():
        notes.append(f"{arm}: skipped ({why}).")
    if result.interrupted is not None:
        complete = sum(1 for r in result.runs if r.error is None)
        notes.append(
            f"INTERRUPTED ({result.interrupted}): {complete} of {result.planned} runs complete,"
            f" {max(0, result.planned - len(result.runs))} not run."
        )
    return text + "\n\n" + "\n".join(notes) + "\n"


def write_json(result: ExperimentResult, path: str) -> None:
    """Every parameter, stage sample, timeline sample and summary, as one JSON document."""
    doc = result.as_dict()
    doc["summary"] = [s.as_dict() for s in summaries(result)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def plot_title(result: ExperimentResult) -> str:
    """What the figure shows, in one line: size, seed, wait, order, and an interruption."""
    p = result.params
    parts = ["zfs-ram experiment"]
    if "size_mib" in p:
        parts.append(f"{p['size_mib']:g} MiB")
    if "seed" in p:
        parts.append(f"seed {p['seed']}")
    if "wait" in p:
        parts.append(f"wait {p['wait']:g} s")
    if "order" in p:
        parts.append(f"{p['order']} writes")
    title = ", ".join(parts)
    if result.interrupted is not None:
        title += f" (interrupted: {len(result.runs)} of {result.planned} runs)"
    return title


def build_figure(result: ExperimentResult) -> Figure | None:
    """Memory used over each run, one panel per arm, one colour per delete fraction.

    Solid: mem_used_total; dashed: compr_data_size; dotted: the daemon's RSS (zfs_ram arms);
    dots mark the stage samples. The one legend sits outside the panels, right of them, so
    it hides no line. None if no run has a sample.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    arms = list(dict.fromkeys(r.arm for r in result.runs))
    if not arms:
        return None
    fig = Figure(figsize=(11, 2.8 * len(arms) + 0.6), layout="constrained")
    axes = fig.subplots(len(arms), 1, sharex=True, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fractions = list(
        dict.fromkeys([*result.params.get("fractions", []), *(r.fraction for r in result.runs)])
    )
    color_of = {f: colors[i % len(colors)] for i, f in enumerate(fractions)}
    described = result.params.get("arm_descriptions", {})
    for ax, arm in zip(axes[:, 0], arms, strict=True):
        for run in (r for r in result.runs if r.arm == arm and r.timeline):
            color = color_of[run.fraction]
            t = [s.t for s in run.timeline]
            ax.plot(t, [s.mm.mem_used_total / MIB for s in run.timeline], color=color)
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
        title = arm + (f": {described[arm]}" if arm in described else "")
        ax.set_title(
            title + (f" (failed or stopped: {', '.join(failed)})" if failed else ""),
            fontsize="medium",
            loc="left",
        )
        ax.set_ylabel("MiB")
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since mount")
    handles = [
        Line2D([], [], color=color_of[f], label=f"delete {f:.0%}")
        for f in fractions
        if any(r.fraction == f and r.timeline for r in result.runs)
    ]
    handles += [
        Line2D([], [], color="black", label="mem_used_total"),
        Line2D([], [], color="black", linestyle="--", linewidth=0.8, label="compr_data_size"),
        Line2D([], [], color="black", linestyle=":", linewidth=0.8, label="daemon RSS"),
        Line2D([], [], color="black", marker="o", markersize=3, linestyle="", label="stage ends"),
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    fig.suptitle(plot_title(result))
    return fig


def write_plot(result: ExperimentResult, path: str) -> None:
    """build_figure(), saved as a PNG (nothing written if there is nothing to draw)."""
    fig = build_figure(result)
    if fig is not None:
        fig.savefig(path, dpi=100)
