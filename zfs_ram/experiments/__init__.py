"""Experiments: the fragmentation workload, the targets it runs on, and their reports.

``zfs-ram experiment`` (cli.py) fills a fresh filesystem with a seeded file set, deletes a
fraction of it, waits, compacts, and compares memory per compressed byte across zfs_ram's
allocators and the kernel's zram. Layers: workload (files) -> targets (filesystems) ->
runner (stages, sampling) -> report (table, JSON, plot) -> cli.
"""

from zfs_ram.experiments.report import render_table, summarize, write_json, write_plot
from zfs_ram.experiments.runner import ExperimentResult, RunResult, run_experiment, run_one
from zfs_ram.experiments.targets import KernelZramTarget, MmStat, ZfsRamTarget
from zfs_ram.experiments.workload import (
    FileSet,
    WorkloadSpec,
    build_file_set,
    choose_deletions,
    write_file_set,
)

__all__ = [
    "ExperimentResult",
    "FileSet",
    "KernelZramTarget",
    "MmStat",
    "RunResult",
    "WorkloadSpec",
    "ZfsRamTarget",
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
