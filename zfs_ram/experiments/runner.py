"""Run the workload on each arm for each delete fraction and record every sample.

One run = one fresh target, then four stages (five for an arm with steps after the fill),
each ending with a stage sample:
  fill     every file written (shuffled page order by default), then sync
  tier     the arm's steps after the fill, if it has any (mark idle, recompress, write back)
  delete   the chosen files unlinked in shuffled order, then sync (+ fstrim on ext4)
  wait     idle for ``wait`` seconds: does memory come back on its own?
  compact  one explicit compaction, timed
A sampler thread reads mm_stat every ~100 ms during the whole run, for the plot.

An interruption (Ctrl-C, or SIGTERM turned into ``Interrupted`` by the CLI) ends the
experiment, not the program: the current target is torn down, the run in progress is kept
with the stages it finished, and run_experiment returns what it has, marked interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from zfs_ram.client import ControlError
from zfs_ram.experiments.targets import MmStat, Target, read_vmstat
from zfs_ram.experiments.workload import (
    FileSet,
    choose_deletions,
    delete_files,
    write_file_set,
)

STAGES = ("fill", "tier", "delete", "wait", "compact")
TIER = "tier"  # only for targets with steps after the fill
# The sampler's period: fine enough to see compaction, coarse enough to cost nothing.
SAMPLE_INTERVAL = 0.1
DEFAULT_WAIT = 5.0  # seconds idle after the delete; the kernel research waited 10 s


def stages_of(target: Target) -> tuple[str, ...]:
    """The stages a run on ``target`` goes through, in order."""
    return STAGES if target.steps else tuple(s for s in STAGES if s != TIER)


class Interrupted(BaseException):
    """The experiment was asked to stop (SIGINT, SIGTERM): keep what was measured, then exit.

    A BaseException, as KeyboardInterrupt is: the per-run ``except Exception`` that records a
    failed run and goes on must let it through.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@dataclass(frozen=True)
class Sample:
    """One reading: time since the run started, mm_stat, and the holder's RSS."""

    t: float
    mm: MmStat
    rss: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 4), **self.mm.as_dict(), "rss": self.rss}


@dataclass
class RunResult:
    """Everything measured in one (arm, fraction) run."""

    arm: str
    fraction: float
    target: dict[str, Any]
    stages: dict[str, Sample] = field(default_factory=dict)
    timeline: list[Sample] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    deleted_files: int = 0
    deleted_bytes: int = 0
    vmstat: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str | None = None
    failed_attempts: list[str] = field(default_factory=list)  # errors of retried attempts

    @property
    def clean(self) -> bool:
        """False if a shrinker or reclaim ran between fill and wait on the kernel arm.

        drop_caches or reclaim compacts every zram pool on the machine, which would pass for
        idle compaction; zfs_ram's pools are out of the kernel's reach.
        """
        if self.target.get("kind") != "kernel":
            return True
        before, after = self.vmstat.get("fill"), self.vmstat.get("wait")
        if not before or not after:
            return True
        return all(before.get(k) == after.get(k) for k in before)

    def as_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "fraction": self.fraction,
            "target": self.target,
            "stages": {k: v.as_dict() for k, v in self.stages.items()},
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "deleted_files": self.deleted_files,
            "deleted_bytes": self.deleted_bytes,
            "vmstat": self.vmstat,
            "clean": self.clean,
            "error": self.error,
            "failed_attempts": self.failed_attempts,
            "timeline": [s.as_dict() for s in self.timeline],
        }


class Sampler:
    """A thread reading mm_stat every SAMPLE_INTERVAL until stopped."""

    def __init__(self, target: Target, t0: float, interval: float = SAMPLE_INTERVAL) -> None:
        self.target = target
        self.t0 = t0
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mm_stat-sampler", daemon=True)

    def take(self) -> Sample:
        return Sample(time.monotonic() - self.t0, self.target.mm_stat(), self.target.rss_bytes())

    def _loop(self) -> None:
        while not self._stop.is_set():
            # A read can fail while the target goes away; the stage samples still count.
            with contextlib.suppress(OSError, ValueError, ControlError):
                self.samples.append(self.take())
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m: what a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Schedule:
    """The planned runs, for the progress line: "run k of N" and the time left.

    The estimate comes from the runs done so far: a run still to come is expected to take as
    long as the runs of its arm did on average (the arms differ: zstd compresses slower, the
    kernel's zram is faster), or the average of all runs for an arm not run yet. Before any
    run has finished there is no estimate.
    """

    def __init__(self, planned: Sequence[str], clock: Callable[[], float] = time.monotonic):
        self.planned = list(planned)  # the arm of each run, in order
        self.clock = clock
        self.done: list[tuple[str, float]] = []  # (arm, seconds) of finished runs
        self.current = 0  # 1-based number of the run in progress, 0 before the first
        self._started = 0.0

    @property
    def total(self) -> int:
        return len(self.planned)

    def begin(self) -> None:
        """The next planned run starts (a retry is the same run: call once per run)."""
        self.current += 1
        self._started = self.clock()

    def end(self) -> None:
        """The current run is over, failed or not: its time feeds the estimate."""
        self.done.append((self.planned[self.current - 1], self.clock() - self._started))

    def _estimate(self, arm: str) -> float:
        own = [t for a, t in self.done if a == arm]
        pool = own or [t for _, t in self.done]
        return sum(pool) / len(pool)

    def seconds_left(self) -> float | None:
        """Until the last planned run ends; None while no run has finished."""
        if not self.done:
            return None
        later = sum(self._estimate(a) for a in self.planned[self.current :])
        if self.current > len(self.done):  # a run is in progress
            elapsed = self.clock() - self._started
            later += max(0.0, self._estimate(self.planned[self.current - 1]) - elapsed)
        return later

    def label(self) -> str:
        """ "run 3 of 8, about 2m10s left"; the time is left out until it can be estimated."""
        text = f"run {self.current} of {self.total}"
        left = self.seconds_left()
        return text if left is None else f"{text}, about {format_duration(left)} left"


class Progress:
    """Progress on stderr: a rewritten line on a terminal, one line per stage otherwise.

    With a ``schedule``, every line starts with where the experiment is: "[run 3 of 8, about
    2m10s left]".
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.prefix = ""
        self.schedule: Schedule | None = None
        self._last = 0.0

    def start(self, prefix: str) -> None:
        self.prefix = prefix

    def _line(self, text: str) -> str:
        where = f"[{self.schedule.label()}] " if self.schedule and self.schedule.current else ""
        return f"{where}{self.prefix} {text}"

    def stage(self, text: str) -> None:
        """A stage finished: always shown."""
        if self.quiet:
            return
        line = self._line(text)
        if self.tty:
            self.stream.write("\r\x1b[K" + line + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, text: str) -> None:
        """Transient progress: only on a terminal, at most 10 times a second."""
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self.stream.write(f"\r\x1b[K{self._line(text)}")
        self.stream.flush()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _describe(s: Sample) -> str:
    mm = s.mm
    ratio = mm.mem_used_total / mm.compr_data_size if mm.compr_data_size else float("nan")
    rss = f" rss={_mib(s.rss)}MiB" if s.rss is not None else ""
    return (
        f"orig={_mib(mm.orig_data_size)}MiB compr={_mib(mm.compr_data_size)}MiB "
        f"mem={_mib(mm.mem_used_total)}MiB mem/compr={ratio:.3f} "
        f"compacted={mm.pages_compacted}{rss}"
    )


def run_one(
    target: Target,
    file_set: FileSet,
    fraction: float,
    wait: float = DEFAULT_WAIT,
    order: str = "shuffled",
    progress: Progress | None = None,
    result: RunResult | None = None,
) -> RunResult:
    """Run the stages on a fresh target; the target is set up and torn down here.

    ``result``, if given, is filled as the stages complete, so that a caller keeps the
    finished stages of a run that raised (was interrupted).
    """
    progress = progress or Progress(quiet=True)
    if result is None:
        result = RunResult(arm=target.name, fraction=fraction, target={"name": target.name})
    progress.start(f"[{target.name} {fraction:.0%}]")
    try:
        _run_stages(target, file_set, fraction, wait, order, progress, result)
    except Exception as exc:
        exc.add_note(
            f"in stage {unfinished_stage(result, target)!r} of {target.name} at {fraction:.0%}"
        )
        raise
    return result


def unfinished_stage(result: RunResult, target: Target) -> str:
    """The stage a run was in when it stopped ("teardown" once all were done)."""
    return next((s for s in stages_of(target) if s not in result.stages), "teardown")


def _run_stages(
    target: Target,
    file_set: FileSet,
    fraction: float,
    wait: float,
    order: str,
    progress: Progress,
    result: RunResult,
) -> None:
    """The body of run_one: fills ``result`` as the stages complete."""
    with target:
        result.target = target.describe()
        t0 = time.monotonic()
        with Sampler(target, t0) as sampler:
            try:
                _stages(target, file_set, fraction, wait, order, progress, result, sampler)
            finally:  # an interrupted run keeps its timeline too
                result.timeline = sampler.samples


def _stages(
    target: Target,
    file_set: FileSet,
    fraction: float,
    wait: float,
    order: str,
    progress: Progress,
    result: RunResult,
    sampler: Sampler,
) -> None:
    def stage_done(name: str, started: float) -> None:
        result.stage_seconds[name] = time.monotonic() - started
        result.vmstat[name] = read_vmstat()
        sample = sampler.take()
        result.stages[name] = sample
        progress.stage(f"{name:7s} {result.stage_seconds[name]:6.2f}s {_describe(sample)}")

    def on_write(done: int, total: int) -> None:
        progress.update(f"fill {done}/{total} pages ({done / max(total, 1):.0%})")

    started = time.monotonic()
    write_file_set(target.root, file_set, order, target.direct_io, on_write)
    target.after_delete()  # sync (nothing deleted yet; flushes ext4)
    stage_done("fill", started)

    if target.steps:
        started = time.monotonic()
        for step in target.steps:
            progress.update(f"{TIER}: {step}")
            target.run_step(step)
        stage_done(TIER, started)

    started = time.monotonic()
    victims = choose_deletions(file_set, fraction)
    result.deleted_files = len(victims)
    result.deleted_bytes = delete_files(target.root, file_set, victims)
    target.after_delete()
    stage_done("delete", started)

    started = time.monotonic()
    deadline = started + wait
    while (left := deadline - time.monotonic()) > 0:
        progress.update(f"wait {left:4.1f}s")
        time.sleep(min(0.1, left))
    stage_done("wait", started)

    started = time.monotonic()
    target.compact()
    stage_done("compact", started)
    time.sleep(SAMPLE_INTERVAL)  # one more timeline point after compaction


@dataclass
class ExperimentResult:
    """All runs of one experiment plus its parameters.

    ``interrupted``: why the experiment stopped early ("SIGINT in run 3 of 8"), else None;
    ``planned``: how many runs it was to have.
    """

    params: dict[str, Any]
    workload: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    interrupted: str | None = None
    planned: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "workload": self.workload,
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "planned_runs": self.planned,
            "runs": [r.as_dict() for r in self.runs],
        }


def run_experiment(
    file_set: FileSet,
    arms: Sequence[tuple[str, Callable[[float], Target]]],
    fractions: Sequence[float],
    wait: float = DEFAULT_WAIT,
    order: str = "shuffled",
    progress: Progress | None = None,
    params: dict[str, Any] | None = None,
    retries: int = 1,
    on_run: Callable[[ExperimentResult], None] | None = None,
) -> ExperimentResult:
    """Every arm for every fraction, each on a fresh target built by ``factory(fraction)``.

    A run that fails is tried again on a fresh target up to ``retries`` times (a shared
    machine may unmount or signal things under us); the errors are kept. A run that fails
    every time is recorded with its error and the experiment goes on; the target's teardown
    has already run by then. ``on_run(result)`` is called after each run (to save what is
    measured so far). Interrupted or KeyboardInterrupt stops the experiment: the run in
    progress is kept with the stages it finished and an error saying so, and the result is
    returned with ``interrupted`` set.
    """
    progress = progress or Progress(quiet=True)
    result = ExperimentResult(params=dict(params or {}), workload=file_set.summary())
    schedule = Schedule([name for name, _ in arms for _ in fractions])
    result.planned = schedule.total
    progress.schedule = schedule
    try:
        for name, factory in arms:
            for fraction in fractions:
                schedule.begin()
                _run_with_retries(
                    name, factory, fraction, file_set, wait, order, progress, retries, result.runs
                )
                schedule.end()
                if on_run is not None:
                    on_run(result)
    except (Interrupted, KeyboardInterrupt) as exc:
        why = _signal_name(exc)
        result.interrupted = f"{why} in run {schedule.current} of {schedule.total}"
        complete = sum(1 for r in result.runs if r.error is None)
        progress.stage(
            f"INTERRUPTED by {why}: keeping the results so far"
            f" ({complete} of {schedule.total} runs complete)"
        )
    finally:
        progress.schedule = None
    return result


def _signal_name(exc: BaseException) -> str:
    """The signal that stopped the experiment: Interrupted names it, KeyboardInterrupt is
    Python's own SIGINT."""
    return exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"


def _run_with_retries(
    name: str,
    factory: Callable[[float], Target],
    fraction: float,
    file_set: FileSet,
    wait: float,
    order: str,
    progress: Progress,
    retries: int,
    runs: list[RunResult],
) -> None:
    """One (arm, fraction) run, retried on a fresh target, appended to ``runs``. An
    interruption passes through once the attempt is appended with its finished stages."""
    errors: list[str] = []
    while True:
        run = RunResult(arm=name, fraction=fraction, target={"name": name})
        target: Target | None = None
        try:
            target = factory(fraction)
            run_one(target, file_set, fraction, wait, order, progress, result=run)
        except Exception as exc:  # record it, keep the other arms going
            where = "; ".join(getattr(exc, "__notes__", []))
            errors.append(f"{type(exc).__name__}: {exc}" + (f" ({where})" if where else ""))
            progress.stage(f"FAILED: {errors[-1]}")
            if len(errors) <= retries:
                continue
            run = RunResult(arm=name, fraction=fraction, target=run.target)
            run.error = errors.pop()
        except (Interrupted, KeyboardInterrupt) as exc:
            stage = unfinished_stage(run, target) if target is not None else "setup"
            run.arm = name
            if stage != "teardown":  # stopped during teardown: every stage was measured
                run.error = f"interrupted by {_signal_name(exc)} in stage {stage!r}"
            run.failed_attempts = errors
            runs.append(run)
            raise
        run.arm = name
        run.failed_attempts = errors
        runs.append(run)
        return
