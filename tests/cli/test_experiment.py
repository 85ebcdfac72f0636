"""The fragmentation experiment: workload generator, runner, rendering, and one real run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from types import TracebackType

import lz4.block
import pytest
from conftest import one_error_line, zfs_ram_cli

from zfs_ram.experiments import cli as exp_cli
from zfs_ram.experiments.arms import ARMS
from zfs_ram.experiments.report import (
    render_table,
    summarize,
    write_json,
    write_plot,
)
from zfs_ram.experiments.runner import (
    STAGES,
    ExperimentResult,
    Progress,
    RunResult,
    Sample,
    run_experiment,
    run_one,
    stages_of,
)
from zfs_ram.experiments.targets import (
    KernelZramTarget,
    MmStat,
    Target,
    ZfsRamTarget,
    kernel_zram_available,
)
from zfs_ram.experiments.workload import (
    PAGE_SIZE,
    SYNTH_MAX_SIZE,
    SYNTH_MIN_SIZE,
    FileSet,
    WorkloadSpec,
    build_file_set,
    choose_deletions,
    delete_files,
    list_real_candidates,
    page_order,
    synthetic_page,
    write_file_set,
)

KIB = 1024
MIB = 1 << 20


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A small stand-in for /usr: 40 files of 1 B..40 KiB with text and binary content."""
    root = tmp_path_factory.mktemp("usr")
    paths = []
    for i in range(40):
        path = root / f"f{i:02d}"
        body = (
            (f"line {i} of a text file\n" * (i * 40 + 1)).encode()
            if i % 2
            else os.urandom(i * 1000 + 1)
        )
        path.write_bytes(body)
        paths.append(str(path))
    return paths


def small_set(real: list[str], seed: int = 1, size: int = 2 * MIB) -> FileSet:
    return build_file_set(WorkloadSpec(size_bytes=size, seed=seed), candidates=real)


# --- workload generator -----------------------------------------------------------------------


def test_same_seed_gives_identical_file_set(real_dir: list[str]) -> None:
    a, b = small_set(real_dir), small_set(real_dir)
    assert [(f.name, f.data) for f in a.files] == [(f.name, f.data) for f in b.files]


def test_other_seed_gives_other_files(real_dir: list[str]) -> None:
    a, b = small_set(real_dir, seed=1), small_set(real_dir, seed=2)
    assert [f.data for f in a.files] != [f.data for f in b.files]


def test_file_set_hits_size_and_real_share(real_dir: list[str]) -> None:
    fs = small_set(real_dir, size=2 * MIB)
    summary = fs.summary()
    assert summary["total_bytes"] == 2 * MIB  # synthetic files fill exactly to the target
    # The stand-in /usr holds only ~0.8 MiB, less than the 70% real share asks for.
    assert summary["real_bytes"] == sum(os.path.getsize(p) for p in real_dir)
    fs = build_file_set(WorkloadSpec(size_bytes=MIB, seed=3), candidates=real_dir)
    assert 0.6 * MIB < fs.summary()["real_bytes"] <= 0.7 * MIB + PAGE_SIZE


def test_synthetic_sizes_in_range(real_dir: list[str]) -> None:
    fs = build_file_set(WorkloadSpec(size_bytes=16 * MIB, seed=5, real_share=0), candidates=[])
    sizes = [len(f.data) for f in fs.files]
    assert all(f.random_share is not None for f in fs.files)
    assert all(s <= SYNTH_MAX_SIZE for s in sizes)
    # Only the last file may be cut below the minimum to hit the total exactly.
    assert all(s >= SYNTH_MIN_SIZE for s in sizes[:-1])
    assert sum(sizes) == 16 * MIB
    assert len({s // (64 * KIB) for s in sizes}) > 3  # log-uniform: spread, not one size


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6, 0.9])
def test_synthetic_page_compresses_to_its_random_share(share: float) -> None:
    import random

    page = synthetic_page(random.Random(7), share)
    assert len(page) == PAGE_SIZE
    compressed = len(lz4.block.compress(page, store_size=False))
    assert abs(compressed - share * PAGE_SIZE) < 0.05 * PAGE_SIZE + 64


def test_synthetic_files_cover_many_compressed_sizes(real_dir: list[str]) -> None:
    fs = build_file_set(WorkloadSpec(size_bytes=4 * MIB, seed=1, real_share=0), candidates=[])
    sizes = set()
    for f in fs.files:
        for off in range(0, len(f.data) - PAGE_SIZE + 1, PAGE_SIZE):
            page = f.data[off : off + PAGE_SIZE]
            sizes.add(len(lz4.block.compress(page, store_size=False)) // 256)
    assert len(sizes) >= 12  # spread over most of the 16 buckets of 256 B


def test_list_real_candidates_skips_links_empty_and_big(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    for name, size in (("small", 10), ("empty", 0), ("big", 5000)):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"x" * size)
    os.symlink(os.path.join(root, "small"), os.path.join(root, "link"))
    assert list_real_candidates([root], max_size=4096) == [os.path.join(root, "small")]


def test_deletions_are_seeded_and_sized(real_dir: list[str]) -> None:
    fs = small_set(real_dir)
    half = choose_deletions(fs, 0.5)
    assert half == choose_deletions(fs, 0.5)
    assert len(half) == round(0.5 * len(fs.files)) == len(set(half))
    assert half != sorted(half)  # shuffled order
    assert choose_deletions(fs, 0.0) == []
    assert sorted(choose_deletions(fs, 1.0)) == list(range(len(fs.files)))
    with pytest.raises(ValueError):
        choose_deletions(fs, 1.5)


@pytest.mark.parametrize("order", ["sequential", "interleaved", "shuffled"])
def test_page_order_writes_every_page_once(real_dir: list[str], order: str) -> None:
    fs = small_set(real_dir)
    pairs = list(page_order(fs, order))
    assert len(pairs) == len(set(pairs)) == fs.nr_pages
    if order == "shuffled":
        assert pairs != sorted(pairs)
    else:
        assert pairs == sorted(pairs) if order == "sequential" else pairs != sorted(pairs)


def test_page_order_rejects_unknown(real_dir: list[str]) -> None:
    with pytest.raises(ValueError, match="unknown write order"):
        list(page_order(small_set(real_dir), "backwards"))


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_write_then_delete_on_a_plain_directory(
    real_dir: list[str], tmp_path: os.PathLike[str], order: str
) -> None:
    fs = small_set(real_dir, size=MIB)
    root = str(tmp_path)
    write_file_set(root, fs, order=order, direct=True)  # tmpfs refuses O_DIRECT: falls back
    for f in fs.files:
        with open(os.path.join(root, f.name), "rb") as fh:
            assert fh.read() == f.data, f.name
    victims = choose_deletions(fs, 0.25)
    assert delete_files(root, fs, victims) == sum(len(fs.files[i].data) for i in victims)
    left = sum(len(files) for _, _, files in os.walk(root))
    assert left == len(fs.files) - len(victims)


def test_fill_never_makes_a_file_longer_than_its_data(
    real_dir: list[str], tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's sampler reads the target throughout the fill: a file zero-padded to whole
    pages until a final ftruncate showed it more bytes than the file set holds."""
    fs = small_set(real_dir, size=MIB)
    sizes = {os.path.realpath(os.path.join(tmp_path, f.name)): len(f.data) for f in fs.files}
    too_long: list[str] = []
    pwrite = os.pwrite

    def checked_pwrite(fd: int, data: bytes, offset: int) -> int:
        done = pwrite(fd, data, offset)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.fstat(fd).st_size > sizes[path]:
            too_long.append(path)
        return done

    monkeypatch.setattr(os, "pwrite", checked_pwrite)
    write_file_set(str(tmp_path), fs, order="shuffled")
    monkeypatch.undo()
    assert too_long == []
    for f in fs.files:
        with open(os.path.join(str(tmp_path), f.name), "rb") as fh:
            assert fh.read() == f.data, f.name


# --- mm_stat and rendering --------------------------------------------------------------------


def test_mm_stat_parse() -> None:
    mm = MmStat.parse("  4096 1000 8192 0 8192 3 7 1 2\n")
    assert (mm.orig_data_size, mm.compr_data_size, mm.mem_used_total) == (4096, 1000, 8192)
    assert (mm.pages_compacted, mm.huge_pages, mm.huge_pages_since) == (7, 1, 2)
    assert MmStat.parse("1 2 3").same_pages == 0  # old kernels: fewer columns
    with pytest.raises(ValueError):
        MmStat.parse("1 2")


def _mm(compr: int, mem: int, compacted: int = 0) -> MmStat:
    return MmStat(compr * 2, compr, mem, 0, mem, 0, compacted, 0, 0)


FAKE_FIGURES = {
    "fill": (100, 102, 0),
    "delete": (50, 82, 0),
    "wait": (50, 82, 0),
    "compact": (50, 52, 30 * 256),
}


def fake_run(
    arm: str = "zsmalloc-off",
    fraction: float = 0.5,
    figures: dict[str, tuple[int, int, int]] | None = None,
) -> RunResult:
    """fill: 100 MiB compr in 102 MiB; delete frees 50 compr but only 20 mem; compact fixes it.

    ``figures``: (compr MiB, mem MiB, pages compacted) per stage instead, e.g. with a tier."""
    run = RunResult(arm=arm, fraction=fraction, target={"name": arm})
    figures = figures or FAKE_FIGURES
    for i, stage in enumerate(s for s in STAGES if s in figures):
        compr, mem, compacted = figures[stage]
        sample = Sample(float(i), _mm(compr * MIB, mem * MIB, compacted), 200 * MIB - i * MIB)
        run.stages[stage] = sample
        run.timeline.append(sample)
        run.stage_seconds[stage] = 0.25
    return run


def test_summarize_ratios_and_freed_share() -> None:
    s = summarize(fake_run())
    assert s.ratio["fill"] == pytest.approx(1.02)
    assert s.ratio["delete"] == pytest.approx(82 / 50)
    assert s.ratio["compact"] == pytest.approx(52 / 50)
    assert s.freed_share["wait"] == pytest.approx(20 / 50)
    assert s.freed_share["compact"] == pytest.approx(50 / 50)
    assert s.compact_ms == pytest.approx(250)
    assert s.compr_freed == pytest.approx(0.5)
    assert s.pages_compacted == 30 * 256


def test_render_table_plain_and_markdown() -> None:
    result = ExperimentResult(params={}, workload={}, runs=[fake_run(), fake_run("zbud", 0.9)])
    result.skipped["kernel"] = "not root"
    text = render_table(result)
    lines = text.splitlines()
    assert lines[0].startswith("arm")
    assert "1.020" in lines[1] and "1.640" in lines[1] and "0.40" in lines[1]
    assert lines[1].split()[5] == "50"  # compr freed%
    assert lines[2].startswith("zbud") and "  90  " in lines[2]
    assert "kernel: skipped (not root)" in text
    md = render_table(result, markdown=True).splitlines()
    assert md[0].startswith("| arm |") and md[1].startswith("|---|")
    assert md[2].count("|") == md[0].count("|")


def test_render_table_marks_failed_and_unclean_runs() -> None:
    failed = RunResult(arm="zbud", fraction=0.25, target={}, error="RuntimeError: boom")
    unclean = fake_run("kernel")
    unclean.target["kind"] = "kernel"
    unclean.vmstat = {"fill": {"drop_slab": 1}, "wait": {"drop_slab": 2}}
    text = render_table(ExperimentResult(params={}, workload={}, runs=[failed, unclean]))
    assert "FAILED zbud at 25%: RuntimeError: boom" in text
    assert "kernel *" in text and "shrinker" in text


def test_json_holds_every_sample(tmp_path: os.PathLike[str]) -> None:
    result = ExperimentResult(params={"seed": 1}, workload={"files": 3}, runs=[fake_run()])
    path = os.path.join(tmp_path, "e.json")
    write_json(result, path)
    with open(path) as f:
        doc = json.load(f)
    run = doc["runs"][0]
    assert list(run["stages"]) == list(FAKE_FIGURES)
    assert len(run["timeline"]) == 4 and run["timeline"][0]["compr_data_size"] == 100 * MIB
    assert doc["summary"][0]["freed_share"]["wait"] == pytest.approx(0.4)
    assert doc["params"] == {"seed": 1}


def test_plot_is_a_png(tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("matplotlib")
    result = ExperimentResult(params={}, workload={}, runs=[fake_run(), fake_run("zbud")])
    path = os.path.join(tmp_path, "e.png")
    write_plot(result, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# The bytes ratios against the reference arm: zstd stores less, a tier step shrinks after the fill.
# --- runner, with a target that is a plain directory ------------------------------------------


class DirTarget(Target):
    """A directory whose "mm_stat" counts the bytes of its files; compaction makes it dense."""

    def __init__(self, root: str, fail_on: str | None = None) -> None:
        self.name = "dir"
        self.base = root
        self.fail_on = fail_on
        self.entered = self.exited = 0
        self.mem = 0
        self.compactions = 0

    def __enter__(self) -> DirTarget:
        self.entered += 1
        self.root = os.path.join(self.base, f"run{self.entered}")
        os.mkdir(self.root)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exited += 1

    def _stored(self) -> int:
        return sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.root) for f in files
        )

    def mm_stat(self) -> MmStat:
        stored = self._stored()
        self.mem = max(self.mem, stored)  # memory never shrinks by itself ...
        return _mm(stored, self.mem, self.compactions)

    def compact(self) -> None:
        if self.fail_on == "compact":
            raise RuntimeError("compaction failed")
        self.mem = self._stored()  # ... only compaction gives it back
        self.compactions += 1


def test_run_one_records_stages_and_timeline(
    real_dir: list[str], tmp_path: os.PathLike[str]
) -> None:
    fs = small_set(real_dir, size=MIB)
    target = DirTarget(str(tmp_path))
    run = run_one(target, fs, 0.5, wait=0.3)
    assert target.entered == target.exited == 1
    assert list(run.stages) == list(stages_of(target)) == ["fill", "delete", "wait", "compact"]
    assert run.stages["fill"].mm.compr_data_size == fs.total_bytes
    assert run.deleted_files == round(len(fs.files) / 2)
    assert run.stages["delete"].mm.compr_data_size == fs.total_bytes - run.deleted_bytes
    assert run.stages["wait"].mm.mem_used_total == fs.total_bytes  # nothing came back idle
    assert run.stages["compact"].mm.mem_used_total == fs.total_bytes - run.deleted_bytes
    assert run.stage_seconds["wait"] >= 0.3
    assert len(run.timeline) >= 3  # the sampler ran during the wait
    times = [s.t for s in run.timeline]
    assert times == sorted(times)


def test_run_experiment_records_failures_and_tears_down(
    real_dir: list[str], tmp_path: os.PathLike[str]
) -> None:
    fs = small_set(real_dir, size=MIB // 2)
    good, bad = DirTarget(str(tmp_path)), DirTarget(str(tmp_path), fail_on="compact")
    bad.base = os.path.join(str(tmp_path), "bad")
    os.mkdir(bad.base)
    result = run_experiment(
        fs, [("good", lambda f: good), ("bad", lambda f: bad)], [0.25, 0.75], wait=0.0, retries=1
    )
    assert [(r.arm, r.fraction) for r in result.runs] == [
        ("good", 0.25),
        ("good", 0.75),
        ("bad", 0.25),
        ("bad", 0.75),
    ]
    assert [r.error for r in result.runs[:2]] == [None, None]
    assert all("compaction failed" in (r.error or "") for r in result.runs[2:])
    assert "in stage 'compact' of dir at 25%" in (result.runs[2].error or "")
    assert bad.entered == bad.exited == 4  # each failed run was tried twice
    assert len(result.runs[2].failed_attempts) == 1
    assert "retried bad at 25% after: RuntimeError" in render_table(result)


def test_run_experiment_retry_can_succeed(real_dir: list[str], tmp_path: os.PathLike[str]) -> None:
    fs = small_set(real_dir, size=MIB // 4)
    flaky = DirTarget(str(tmp_path), fail_on="compact")

    def factory(fraction: float) -> DirTarget:
        if flaky.entered:  # the second attempt works
            flaky.fail_on = None
        return flaky

    result = run_experiment(fs, [("flaky", factory)], [0.5], wait=0.0, retries=1)
    assert result.runs[0].error is None and len(result.runs[0].failed_attempts) == 1


def test_progress_one_line_per_stage_when_not_a_tty() -> None:
    import io

    out = io.StringIO()
    p = Progress(out)
    p.start("[arm 50%]")
    p.update("fill 10/100")  # transient: not shown off a terminal
    p.stage("fill done")
    assert out.getvalue() == "[arm 50%] fill done\n"


# --- command line -----------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    exp_cli.add_parser(sub)
    return parser.parse_args(["experiment", *argv])


def test_cli_options() -> None:
    args = _parse("--fractions", "0.25,0.5", "--arms", "zbud,kernel", "--size-mib", "8")
    assert args.fractions == [0.25, 0.5]
    assert args.arms == ["zbud", "kernel"]
    assert args.size_mib == 8 and args.func is exp_cli.run_experiment_cli
    assert _parse().fractions == [0.25, 0.5, 0.75, 0.9]
    with pytest.raises(SystemExit):
        _parse("--arms", "zsmalloc,zswap")


# Each of these once ran (16 empty runs for 80 s printing nan, or a 1.5 % delete for "1.5") or
# passed silently; each must be refused before anything runs, in one line, as a usage error.
NONSENSE_OPTIONS = [
    ("--size-mib", "0"),
    ("--size-mib", "-5"),
    ("--size-mib", "nan"),
    ("--size-mib", "inf"),
    ("--size-mib", "0.001"),  # less than one page
    ("--size-mib", str(1 << 40)),  # more RAM than any machine here has
    ("--wait", "-1"),
    ("--wait", "nan"),
    ("--wait", "inf"),
    ("--retries", "-1"),
    ("--fractions", "1.5"),  # was 1.5 %, while "1" meant 100 %
    ("--fractions", "25,50"),  # percentages: a fraction is 0..1
    ("--arms", ""),  # "experiment: no arm to run", not a usage error
    ("--arms", "zbud,zbud"),  # the same runs twice, the second overwriting the first's logs
]
# Refused before as well; kept refused, in one line.
STILL_REFUSED = [
    ("--fractions", "-0.1"),
    ("--fractions", "nan"),
    ("--fractions", "0.5,"),
    ("--fractions", ""),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("option", "value"), NONSENSE_OPTIONS + STILL_REFUSED)
def test_cli_refuses_nonsense_before_running(
    option: str, value: str, tmp_path: os.PathLike[str]
) -> None:
    out = os.path.join(tmp_path, "out")
    result = zfs_ram_cli(
        "experiment",
        *("--arms", "zbud", "--no-kernel", "--quiet", "--out", out, option, value),
        timeout=30,
    )
    line = one_error_line(result)
    assert result.returncode == 2, result
    assert option in line, line
    assert result.stdout == "" and not os.path.exists(out)  # nothing ran


def test_cli_without_runnable_arm_fails(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--arms", "kernel", "--no-kernel")
    assert exp_cli.run_experiment_cli(args) == 2
    assert "kernel skipped: --no-kernel" in capsys.readouterr().err


def test_zfs_ram_target_options() -> None:
    t = ZfsRamTarget("zbud", "off", size_bytes=100 * MIB)
    assert t.options() == f"size={200 * MIB},pool=zbud,compact=off"
    assert t.name == "zbud-off"


# --- one real run -----------------------------------------------------------------------------


def _experiment_mounts() -> list[str]:
    """Mounts made by ZfsRamTarget (its temp dirs are named zfs_ram-exp-*), nobody else's."""
    with open("/proc/mounts") as f:
        return [line for line in f if "/zfs_ram-exp-" in line.split()[1]]


@pytest.mark.mount
@pytest.mark.timeout(90)
def test_real_run_zsmalloc_arms(real_dir: list[str], tmp_path: os.PathLike[str]) -> None:
    """A few MiB on zfs_ram, compaction off and auto: compaction must give memory back."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    before = _experiment_mounts()
    fs = build_file_set(WorkloadSpec(size_bytes=6 * MIB, seed=1), candidates=real_dir)
    arms = [
        (arm.name, lambda f, a=arm: ZfsRamTarget(a.pool, a.compact, fs.total_bytes, a.name))
        for arm in ARMS
        if arm.name.startswith("zsmalloc-")
    ]
    try:
        result = run_experiment(fs, arms, [0.5], wait=1.0)
    finally:
        leftover = [m for m in _experiment_mounts() if m not in before]
        for line in leftover:  # never leave a stale mount, even when the test fails
            mnt = line.split()[1]
            for cmd in (["fusermount3", "-u", mnt], ["fusermount3", "-u", "-z", mnt]):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(cmd, capture_output=True, timeout=30)
    assert leftover == []
    assert [r.error for r in result.runs] == [None, None]
    for run in result.runs:
        s = summarize(run)
        fill, compact = run.stages["fill"].mm, run.stages["compact"].mm
        assert fill.orig_data_size >= fs.total_bytes - 64 * KIB  # same pages may not count
        assert compact.compr_data_size < fill.compr_data_size
        assert compact.mem_used_total < fill.mem_used_total
        assert s.freed_share["compact"] is not None and s.freed_share["compact"] > 0.5
        ratio_compact = s.ratio["compact"]
        assert ratio_compact is not None and ratio_compact <= (s.ratio["delete"] or 0) + 1e-9
    off = summarize(result.runs[0])
    auto = summarize(result.runs[1])
    # With compact=off nothing moves until asked; auto may already have compacted by the wait.
    assert result.runs[0].stages["wait"].mm.pages_compacted == 0
    assert auto.ratio["wait"] is not None and off.ratio["wait"] is not None
    assert auto.ratio["wait"] <= off.ratio["wait"] + 0.05


def test_module_runs_as_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zfs_ram.experiments", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--fractions" in proc.stdout


@pytest.mark.timeout(90)
def test_kernel_arm_creates_and_removes_its_own_device(
    real_dir: list[str], tmp_path: os.PathLike[str]
) -> None:
    """Root on a zram kernel only: a tiny run on the kernel arm, and no device left behind."""
    why = kernel_zram_available()
    if why is not None:
        pytest.skip(f"kernel zram arm unavailable: {why}")
    fs = build_file_set(WorkloadSpec(size_bytes=4 * MIB, seed=1), candidates=real_dir)
    target = KernelZramTarget(fs.total_bytes)
    run = run_one(target, fs, 0.5, wait=0.2)
    assert target.device is None
    device = run.target["device"]  # only ours: other zram devices may come and go meanwhile
    assert device is not None and device.startswith("zram")
    assert not os.path.exists(f"/sys/block/{device}")
    s = summarize(run)
    assert run.stages["fill"].mm.orig_data_size >= fs.total_bytes
    assert s.freed_share["compact"] is not None and s.freed_share["compact"] > 0.5
    assert run.stages["wait"].rss is None  # kernel memory: no process to measure


def _demo_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if "/zfs_ram-demo." in line.split()[1]]


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_fragmentation_sh_prints_four_stages() -> None:
    """examples/fragmentation.sh as `./run demo` calls it, small: one line per stage."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fragmentation.sh")
    env = dict(os.environ, WAIT="0.5", MIN_KIB="64")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    before = _demo_mounts()
    try:
        proc = subprocess.run(
            ["bash", script, "0.5", "4", "zsmalloc", "off", "3"],
            capture_output=True,
            text=True,
            timeout=110,
            env=env,
        )
    finally:
        leftover = [m for m in _demo_mounts() if m not in before]
        for line in leftover:
            subprocess.run(["fusermount3", "-u", "-z", line.split()[1]], capture_output=True)
    assert leftover == []
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["stage", "orig_MiB", "compr_MiB", "mem_MiB", "ratio"]
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert list(rows) == ["fill", "delete", "wait", "compact"]
    assert float(rows["fill"][2]) > float(rows["delete"][2]) > 0  # compressed bytes freed
    assert int(rows["wait"][5]) == 0 < int(rows["compact"][5])  # compact=off: only on request
    assert float(rows["compact"][3]) < float(rows["wait"][3])
    assert "mem_used fell by" in lines[-1]
