"""The experiment's arms and its report: zstd and idle recompression beside lz4, the tier
stage, byte ratios against the reference arm, the progress line (run k of N, time left), the
partial results an interruption keeps, and the plot's legend and title.

Runner and report tests use test_experiment's plain-directory target and fake runs; the real
runs mount zfs_ram (the experiment's own ZfsRamTarget) and leave no mount behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import requires_fuse
from test_experiment import MIB, DirTarget, fake_run

from zfs_ram.experiments import cli as exp_cli
from zfs_ram.experiments.arms import ARMS, ARMS_BY_NAME, IDLE_ALL, Arm, Step
from zfs_ram.experiments.report import build_figure, render_table, summaries
from zfs_ram.experiments.runner import (
    ExperimentResult,
    Interrupted,
    Progress,
    Schedule,
    format_duration,
    run_experiment,
)
from zfs_ram.experiments.targets import MmStat, Target, ZfsRamTarget
from zfs_ram.experiments.workload import FileSet, WorkloadSpec, build_file_set
from zfs_ram.vocabulary import ControlFile


@pytest.fixture(scope="module")
def tiny_set() -> FileSet:
    """256 KiB of synthetic files: enough for the runner tests on a plain directory."""
    return build_file_set(WorkloadSpec(size_bytes=MIB // 4, seed=1, real_share=0), candidates=[])


# --- arms ------------------------------------------------------------------------------------


def test_arms_are_data_and_the_cli_takes_every_one() -> None:
    assert [a.name for a in ARMS] == [
        "zsmalloc-off",
        "zsmalloc-auto",
        "zbud",
        "zstd",
        "lz4-idle-zstd",
        "lz4-writeback",
    ]
    zstd, tiered = ARMS_BY_NAME["zstd"], ARMS_BY_NAME["lz4-idle-zstd"]
    assert (zstd.algorithm, zstd.is_reference) == ("zstd", False)
    assert (tiered.algorithm, tiered.is_reference) == ("lz4", False)  # stores lz4, then changes
    assert ARMS_BY_NAME["zsmalloc-auto"].is_reference
    assert [str(s) for s in tiered.after_fill] == ["echo all > idle", "echo type=idle > recompress"]
    assert (*ARMS_BY_NAME, "kernel") == exp_cli.ALL_ARMS
    parser = exp_cli.argparse.ArgumentParser()
    exp_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["experiment", "--arms", "zstd,lz4-idle-zstd,zbud"])
    assert exp_cli._reference_arm(args.arms) == "zbud"
    assert exp_cli._reference_arm(["zstd", "lz4-idle-zstd"]) is None


def test_an_arm_becomes_the_target_the_cli_mounts(tmp_path: os.PathLike[str]) -> None:
    target = exp_cli._zfs_ram_factory(ARMS_BY_NAME["lz4-idle-zstd"], 10 * MIB, str(tmp_path))(0.5)
    assert isinstance(target, ZfsRamTarget)
    log = os.path.join(os.path.abspath(tmp_path), "lz4-idle-zstd-50.log")
    assert target.options() == (
        f"size={64 * MIB},pool=zsmalloc,compact=auto,log={log},recomp_algorithm=zstd"
    )
    assert target.steps == (IDLE_ALL, Step(ControlFile.RECOMPRESS, "type=idle\n"))


@requires_fuse
@pytest.mark.timeout(60)
def test_tmpdir_in_an_arms_options_is_the_runs_own_directory() -> None:
    """What a backing-file arm needs: a path of its own per run, gone after it."""
    arm = Arm("own-file", "log={tmpdir}/daemon.log")
    target = ZfsRamTarget(arm.pool, arm.compact, MIB, arm.name, extra_options=arm.options)
    assert target.options().endswith(",log={tmpdir}/daemon.log")  # not mounted yet
    with target:
        assert target.options().endswith(f",log={target.tmpdir}/daemon.log")
        assert os.path.isfile(os.path.join(target.tmpdir, "daemon.log"))
    assert not os.path.exists(target.tmpdir)
    assert not _mounted(target.root)


# --- report: byte ratios, the plot ----------------------------------------------------------


ZSTD_FIGURES = {
    "fill": (80, 82, 0),
    "delete": (40, 62, 0),
    "wait": (40, 62, 0),
    "compact": (40, 42, 0),
}
TIER_FIGURES = {
    "fill": (100, 102, 0),
    "tier": (85, 95, 0),
    "delete": (42, 70, 0),
    "wait": (42, 70, 0),
    "compact": (42, 44, 0),
}


def test_summary_compares_bytes_with_the_reference_arm() -> None:
    ref, zstd = fake_run("zsmalloc-auto"), fake_run("zstd", figures=ZSTD_FIGURES)
    tiered = fake_run("lz4-idle-zstd", figures=TIER_FIGURES)
    result = ExperimentResult(
        params={"reference_arm": "zsmalloc-auto"}, workload={}, runs=[ref, zstd, tiered]
    )
    s_ref, s_zstd, s_tier = summaries(result)
    assert s_ref.compr_vs_reference == 1.0
    assert s_zstd.compr_vs_reference == pytest.approx(0.8)
    assert s_zstd.mem_vs_reference == pytest.approx(82 / 102)
    # The tier arm is measured once its steps are done, and the delete against that.
    assert (s_tier.compr_fill, s_tier.compr_stored) == (100 * MIB, 85 * MIB)
    assert s_tier.compr_vs_reference == pytest.approx(0.85)
    assert s_tier.mem_vs_reference == pytest.approx(95 / 102)
    assert s_tier.compr_freed == pytest.approx(1 - 42 / 85)
    assert s_tier.freed_share["compact"] == pytest.approx((95 - 44) / (85 - 42))
    assert s_tier.ratio["tier"] == pytest.approx(95 / 85)
    rows = render_table(result).splitlines()
    header = rows[0]
    assert header.split()[:5] == ["arm", "del%", "compr", "MiB", "x"]
    assert rows[2].split()[:5] == ["zstd", "50", "80.0", "0.800", "0.804"]
    assert rows[3].split()[:5] == ["lz4-idle-zstd", "50", "85.0", "0.850", "0.931"]
    assert rows[2].split()[7] == "-"  # no tier stage for zstd: its column is empty
    assert rows[3].split()[7] == f"{95 / 85:.3f}"
    assert "/ zsmalloc-auto's" in render_table(result)
    # Without a reference arm the ratios are left out, not made up.
    alone = ExperimentResult(params={}, workload={}, runs=[zstd])
    assert summaries(alone)[0].compr_vs_reference is None
    assert render_table(alone).splitlines()[1].split()[3] == "-"


def _line_points_in_display(line: Any, steps: int = 40) -> list[tuple[float, float]]:
    """The line's vertices and points along each of its segments, in display pixels."""
    xy = line.get_transform().transform(line.get_xydata())
    points = [tuple(p) for p in xy]
    if line.get_linestyle() not in ("None", "", " "):
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:], strict=True):
            points += [
                (x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps) for k in range(steps)
            ]
    return points


def test_plot_legend_hides_no_line_and_title_names_size_and_seed() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # Runs of the same length, whose RSS lines run along the top of their panels and whose
    # memory lines run along the bottom, from the first second to the last: a legend inside a
    # panel, wherever it goes ("best" included), covers some line.
    runs = [fake_run("lz4-idle-zstd", f, figures=TIER_FIGURES) for f in (0.25, 0.5, 0.75, 0.9)]
    runs += [fake_run("zbud", 0.5, figures=TIER_FIGURES)]
    params = {
        "size_mib": 32,
        "seed": 7,
        "wait": 5.0,
        "order": "shuffled",
        "fractions": [0.25, 0.5, 0.75, 0.9],
    }
    fig = build_figure(ExperimentResult(params=params, workload={}, runs=runs))
    assert fig is not None
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    texts = [t.get_text() for t in legends[0].get_texts()]
    assert texts[:4] == ["delete 25%", "delete 50%", "delete 75%", "delete 90%"]
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 5 * 4  # mem, compr, RSS, stage dots per run
    for line in lines:
        hidden = [p for p in _line_points_in_display(line) if box.contains(*p)]
        assert hidden == [], f"the legend hides a line of {line.axes.get_title(loc='left')}"
    title = fig.get_suptitle()
    assert "32 MiB" in title and "seed 7" in title
    assert fig.axes[0].get_title(loc="left").startswith("lz4-idle-zstd")


# --- progress and interruption --------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_schedule_counts_runs_and_estimates_from_runs_done() -> None:
    clock = FakeClock()
    schedule = Schedule(["a", "a", "b", "b"], clock=clock)
    schedule.begin()
    assert schedule.label() == "run 1 of 4"  # nothing done: no estimate yet
    clock.now += 10
    schedule.end()
    schedule.begin()
    assert schedule.seconds_left() == pytest.approx(30)  # each run to come as long as the first
    assert schedule.label() == "run 2 of 4, about 30s left"
    clock.now += 4  # the current run counts down
    assert schedule.seconds_left() == pytest.approx(26)
    clock.now += 16  # longer than expected: the current run's share is 0, not negative
    assert schedule.seconds_left() == pytest.approx(20)
    schedule.end()  # a's runs took 10 and 20 s: 15 s on average
    schedule.begin()
    clock.now += 60
    schedule.end()  # b's first run took 60 s: the next b run is expected to as well
    schedule.begin()
    assert schedule.label() == "run 4 of 4, about 1m00s left"
    clock.now += 45
    assert schedule.label() == "run 4 of 4, about 15s left"
    assert [format_duration(t) for t in (0, 59.4, 61, 3600 * 2 + 65)] == [
        "0s",
        "59s",
        "1m01s",
        "2h01m",
    ]


def test_progress_line_names_run_k_of_n_and_the_time_left(
    tiny_set: FileSet, tmp_path: os.PathLike[str]
) -> None:
    fs = tiny_set
    out = io.StringIO()
    target = DirTarget(str(tmp_path))  # one directory per run: run1, run2, ...
    arms = [(name, lambda f: target) for name in ("a", "b")]
    run_experiment(fs, arms, [0.25, 0.75], wait=0.0, progress=Progress(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 * 4  # four stages per run
    assert all(line.startswith("[run 1 of 4] [dir 25%] ") for line in lines[:4])
    for k, line in enumerate(lines[4:], start=4):
        assert re.match(rf"\[run {k // 4 + 1} of 4, about \d+s left\] \[dir \d+%\] ", line), line


class InterruptingDirTarget(DirTarget):
    """A DirTarget whose wait stage is cut short, on its ``nth`` run, as by Ctrl-C."""

    def __init__(self, root: str, nth: int, exc: BaseException) -> None:
        super().__init__(root)
        self.nth = nth
        self.exc = exc

    def mm_stat(self) -> MmStat:
        mm = super().mm_stat()
        if self.entered == self.nth and threading.current_thread() is threading.main_thread():
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:  # the samples of fill and delete are taken: raise in the wait's
                raise self.exc
        return mm


@pytest.mark.parametrize(
    ("exc", "name"),
    [(Interrupted(signal.SIGTERM), "SIGTERM"), (KeyboardInterrupt(), "SIGINT")],
)
def test_interruption_keeps_the_runs_so_far(
    tiny_set: FileSet, tmp_path: os.PathLike[str], exc: BaseException, name: str
) -> None:
    fs = tiny_set
    target = InterruptingDirTarget(str(tmp_path), nth=2, exc=exc)
    saved: list[int] = []
    result = run_experiment(
        fs,
        [("a", lambda f: target), ("b", lambda f: target)],
        [0.5],
        wait=0.0,
        on_run=lambda r: saved.append(len(r.runs)),
    )
    assert target.entered == target.exited == 2  # torn down, and nothing after the stop ran
    assert saved == [1]  # saved after the run that finished
    assert result.interrupted == f"{name} in run 2 of 2" and result.planned == 2
    done, stopped = result.runs
    assert done.error is None and list(done.stages) == ["fill", "delete", "wait", "compact"]
    assert stopped.arm == "b" and list(stopped.stages) == ["fill", "delete"]
    assert stopped.error == f"interrupted by {name} in stage 'wait'"
    assert stopped.timeline  # the samples up to the stop are kept
    text = render_table(result)
    assert "b (stopped)" in text and f"INTERRUPTED ({name} in run 2 of 2): 1 of 2 runs" in text


def test_a_stop_during_teardown_keeps_the_run_complete(
    tiny_set: FileSet, tmp_path: os.PathLike[str]
) -> None:
    """Every stage measured, then Ctrl-C while the target goes down: the run counts in full."""

    class StoppedOnTheWayOut(DirTarget):
        def __exit__(self, *exc: object) -> None:
            super().__exit__(None, None, None)
            raise KeyboardInterrupt

    target = StoppedOnTheWayOut(str(tmp_path))
    result = run_experiment(tiny_set, [("a", lambda f: target)], [0.25, 0.5], wait=0.0)
    assert target.entered == target.exited == 1
    assert result.interrupted == "SIGINT in run 1 of 2"
    (run,) = result.runs
    assert run.error is None and list(run.stages) == ["fill", "delete", "wait", "compact"]
    assert "(stopped)" not in render_table(result)
    assert "1 of 2 runs complete, 1 not run." in render_table(result)


def test_teardown_holds_back_a_stop_signal_until_done(tmp_path: os.PathLike[str]) -> None:
    """A Ctrl-C during the unmount would leave the mount behind: it waits until after."""
    events: list[str] = []

    class SignalledDuringTeardown(DirTarget):
        def _teardown(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal would have been handled here
            events.append("teardown done")

    def on_sigint(signum: int, frame: object) -> None:
        events.append("signal")
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        target = SignalledDuringTeardown(str(tmp_path))
        with pytest.raises(Interrupted):
            Target.__exit__(target, None, None, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert events == ["teardown done", "signal"]


# --- real runs -------------------------------------------------------------------------------


def _experiment_mounts() -> list[str]:
    """Mount points made by ZfsRamTarget (temp dirs named zfs_ram-exp-*), nobody else's."""
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if "/zfs_ram-exp-" in line.split()[1]]


def _mounted(path: str) -> bool:
    return path in _experiment_mounts()


@contextlib.contextmanager
def no_mount_left_behind() -> Iterator[None]:
    """Fails the test if an experiment mount outlives it, and takes such a mount down."""
    before = set(_experiment_mounts())
    try:
        yield
    finally:
        leftover = [m for m in _experiment_mounts() if m not in before]
        for mnt in leftover:
            for cmd in (["fusermount3", "-u", mnt], ["fusermount3", "-u", "-z", mnt]):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(cmd, capture_output=True, timeout=30)
    assert leftover == []


@requires_fuse
@pytest.mark.timeout(180)
def test_zstd_and_idle_recompression_store_fewer_bytes_than_lz4(
    tmp_path: os.PathLike[str],
) -> None:
    """The new arms on real mounts, built as the CLI builds them, and their report."""
    stdlib = os.path.dirname(os.__file__)  # real text and bytecode, quick to list
    fs = build_file_set(WorkloadSpec(size_bytes=6 * MIB, seed=1, real_roots=(stdlib,)))
    names = ["zsmalloc-auto", "zstd", "lz4-idle-zstd"]
    log_dir = os.path.join(tmp_path, "logs")
    arms = [(n, exp_cli._zfs_ram_factory(ARMS_BY_NAME[n], fs.total_bytes, log_dir)) for n in names]
    params = {"reference_arm": exp_cli._reference_arm(names), "size_mib": 6, "seed": 1}
    out = io.StringIO()
    with no_mount_left_behind():
        result = run_experiment(fs, arms, [0.5], wait=0.5, progress=Progress(out), params=params)
    assert [r.error for r in result.runs] == [None, None, None], out.getvalue()
    lz4, zstd, tiered = result.runs
    assert "tier" not in lz4.stages and "tier" not in zstd.stages
    assert list(tiered.stages) == ["fill", "tier", "delete", "wait", "compact"]
    assert tiered.target["steps"] == ["echo all > idle", "echo type=idle > recompress"]
    # The same data on each: the same pages stored.
    orig = {r.stages["fill"].mm.orig_data_size for r in result.runs}
    assert len(orig) == 1
    s_lz4, s_zstd, s_tier = summaries(result)
    # The tier arm stores lz4's bytes until its steps, then about zstd's.
    assert s_tier.compr_fill == s_lz4.compr_fill
    assert s_zstd.compr_vs_reference is not None and s_zstd.compr_vs_reference < 0.9
    assert s_tier.compr_vs_reference is not None and s_tier.compr_vs_reference < 0.9
    assert abs(s_tier.compr_stored - s_zstd.compr_stored) < 0.02 * s_zstd.compr_stored
    assert s_zstd.mem_vs_reference is not None and s_zstd.mem_vs_reference < 0.92
    # Deleting half still gives the memory back on each (compact=auto, then compact).
    for s in (s_lz4, s_zstd, s_tier):
        assert s.freed_share["compact"] is not None and s.freed_share["compact"] > 0.8
    rows = {line.split()[0]: line.split() for line in render_table(result).splitlines()[1:4]}
    assert rows["zstd"][3] == f"{s_zstd.compr_vs_reference:.3f}"
    assert rows["lz4-idle-zstd"][7] != "-" and rows["zstd"][7] == "-"  # the tier column
    assert re.search(r"\[run 3 of 3, about \d+s left\] \[lz4-idle-zstd 50%\] tier ", out.getvalue())


# The second run's wait, in which the test stops the CLI: long enough for the signal to land in
# it on a busy machine, short enough for the first run, which waits as long, to be quick.
STOP_WAIT = 4


@requires_fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_experiment_keeps_its_results_and_says_so(
    tmp_path: os.PathLike[str], signum: int
) -> None:
    """Ctrl-C or SIGTERM in the second run's wait: the first run's results and the second's
    finished stages are in experiment.json, the table and the plot; exit status 128 + signal;
    no mount is left behind."""
    out = os.path.join(tmp_path, "out")
    cmd = [
        sys.executable,
        "-m",
        "zfs_ram.experiments",
        *("--arms", "zsmalloc-off,zstd", "--size-mib", "2", "--fractions", "0.5"),
        *("--wait", str(STOP_WAIT), "--no-kernel", "--out", out),
    ]
    progress: list[str] = []
    with (
        no_mount_left_behind(),
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        ) as proc,
    ):
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # one line per stage
                progress.append(line)
                if line.startswith("[run 2 of 2") and " delete " in line:
                    if signum == signal.SIGINT:  # as Ctrl-C sends it: to the whole group
                        os.killpg(proc.pid, signum)
                    else:  # as kill(1) or systemd does
                        proc.send_signal(signum)
                    break
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr
    assert f"INTERRUPTED by {name}: keeping the results so far (1 of 2 runs complete)" in stderr
    with open(os.path.join(out, "experiment.json")) as f:
        doc = json.load(f)
    assert doc["interrupted"] == f"{name} in run 2 of 2" and doc["planned_runs"] == 2
    done, stopped = doc["runs"]
    assert done["error"] is None and list(done["stages"]) == ["fill", "delete", "wait", "compact"]
    assert stopped["arm"] == "zstd" and list(stopped["stages"]) == ["fill", "delete"]
    assert stopped["error"] == f"interrupted by {name} in stage 'wait'"
    assert stopped["timeline"] and doc["summary"][1]["compr_vs_reference"] < 1
    table = stdout.splitlines()
    assert table[0].startswith("arm") and table[1].startswith("zsmalloc-off  ")
    assert table[2].startswith("zstd (stopped)")
    assert f"INTERRUPTED ({name} in run 2 of 2): 1 of 2 runs complete, 0 not run." in stdout
    with open(os.path.join(out, "experiment.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
