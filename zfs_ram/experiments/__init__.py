"""Experiments: the fragmentation workload, the targets it runs on, and their reports.

``zfs-ram experiment`` (cli.py) fills a fresh filesystem with a seeded file set, deletes a
fraction of it, waits, compacts, and compares memory per compressed byte across zfs_ram's
allocators, compressors and tiers and the kernel's zram. Layers: workload (files) -> arms
(configurations, as data) -> targets (filesystems) -> runner (stages, sampling, progress,
interruption) -> report (table, JSON, plot) -> cli.
"""

from zfs_ram.experiments.arms import ARMS, Arm, Step
from zfs_ram.experiments.report import (
    build_figure,
    render_table,
    summarize,
    write_json,
    write_plot,
)
from zfs_ram.experiments.runner import (
    ExperimentResult,
    Interrupted,
    RunResult,
    run_experiment,
    run_one,
)
from zfs_ram.experiments.targets import KernelZramTarget, MmStat, ZfsRamTarget
from zfs_ram.experiments.workload import (
    FileSet,
    WorkloadSpec,
    build_file_set,
    choose_deletions,
    write_file_set,
)

__all__ = [
    "ARMS",
    "Arm",
    "ExperimentResult",
    "FileSet",
    "Interrupted",
    "KernelZramTarget",
    "MmStat",
    "RunResult",
    "Step",
    "WorkloadSpec",
    "ZfsRamTarget",
    "build_figure",
    "build_file_set",
    "choose_deletions",
    "render_table",
    "run_experiment",
    "run_one",
    "summarize",
    "write_file_set",
    "write_json",
    "write_plot",
]
