"""benchmarks/ci_job.py --quick: every phase runs on tmpfs and zfs_ram, every figure has its
ratio to tmpfs, zfs_ram's requests are counted per phase, and no mount is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import cli_env, requires_fuse

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ci_job.py"
PHASES = ("unpack", "compileall", "git", "sqlite", "grep", "gcc", "rm")
RUN_TIMEOUT = 55.0  # the smoke run takes 5-15 s here; under the test's own timeout


def tmpfs_unavailable_reason() -> str | None:
    """Why `mount -t tmpfs` cannot work here, or None if it can."""
    if os.geteuid() != 0:
        return "mounting tmpfs needs root"
    with tempfile.TemporaryDirectory(prefix="ci_job-probe-") as where:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode:
            return f"mount -t tmpfs failed: {mounted.stderr.strip()}"
        subprocess.run(["umount", where], check=False)
    return None


def rows(stdout: str, header: str) -> dict[str, list[str]]:
    """The rows of the table whose header line contains `header`, by their first word."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("phase") and header in line)
    table: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:  # past the header and its rule
        if not line.strip():
            break
        first, *rest = line.split()
        table[first] = rest
    return table


@requires_fuse
@pytest.mark.timeout(60)
def test_quick_run_times_every_phase_and_counts_zfs_rams_requests(tmp_path: Path) -> None:
    if (why := tmpfs_unavailable_reason()) is not None:
        pytest.skip(f"needs tmpfs mounts: {why}")
    env = cli_env()
    env["TMPDIR"] = str(tmp_path)  # the script's mount points go under tmp_path
    out = tmp_path / "ci_job.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--systems", "tmpfs", "zfs_ram"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    phases = [p for p in PHASES if p != "gcc" or "skipped gcc" not in result.stdout]

    # The timing table: a row per phase and the total, with seconds of both and the ratio.
    times = rows(result.stdout, "tmpfs s")
    assert list(times) == [*phases, "total"]
    summary = json.loads(out.read_text())["summary"]
    for phase, values in times.items():
        tmpfs_s, zfs_s, ratio = (float(v) for v in values[:3])
        assert tmpfs_s >= 0 and zfs_s > 0, phase
        saved = summary[phase]
        assert ratio == pytest.approx(saved["zfs_ram"]["x_tmpfs"], abs=0.005), phase
        # One repetition: the median ratio is the quotient of the two times.
        quotient = saved["zfs_ram"]["seconds"] / saved["tmpfs"]["seconds"]
        assert saved["zfs_ram"]["x_tmpfs"] == pytest.approx(quotient), phase
    assert "WARNING" not in result.stdout and "FAILED" not in result.stdout

    # The requests per phase, printed and saved, counted where the phase must send them.
    printed = rows(result.stdout, "top opcodes")
    assert list(printed) == [*phases, "total"]
    assert all(values[0] not in ("0", "-") for values in printed.values()), printed
    requests = json.loads(out.read_text())["requests"]
    assert set(requests) == {*phases, "total"}
    assert requests["unpack"]["WRITE"]["count"] > 0
    assert requests["unpack"]["CREATE"]["count"] > 0
    assert requests["sqlite"]["WRITE"]["count"] > 0
    assert requests["grep"]["READ"]["count"] > 0
    assert requests["rm"]["UNLINK"]["count"] > 0
    assert "WRITE" in printed["unpack"] and "CREATE" in printed["unpack"]
    total = sum(v["count"] for v in requests["total"].values())
    assert total == sum(sum(v["count"] for v in requests[p].values()) for p in phases)

    # Every system saw the same job: the checks of each phase agree.
    checks: dict[str, set[str]] = {}
    for sample in json.loads(out.read_text())["samples"]:
        if sample["check"] is not None:
            checks.setdefault(sample["phase"], set()).add(sample["check"])
    assert checks and all(len(seen) == 1 for seen in checks.values()), checks

    # Nothing is left mounted, and the mount points are gone.
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mountinfo
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ci_job-")]


def test_reference_table_gives_per_phase_ratios_to_the_other_build() -> None:
    """--reference-tool: zfs_ram / zfs_ram_ref per phase and in total, as the median of the
    per-repetition ratios, with each build's requests beside it."""
    sys.path.insert(0, str(SCRIPT.parent))
    import ci_job

    report = ci_job.Report(
        env={}, systems=["tmpfs", "zfs_ram", "zfs_ram_ref"], phases=["unpack", "rm"]
    )
    seconds = {  # rep -> (zfs_ram, zfs_ram_ref) for unpack; rm takes 1 s on both
        0: (2.0, 4.0),
        1: (3.0, 3.0),
        2: (1.0, 4.0),
    }
    for rep, (mine, ref) in seconds.items():
        for system, unpack in (("tmpfs", 0.5), ("zfs_ram", mine), ("zfs_ram_ref", ref)):
            requests = {"WRITE": {"count": 10.0 if system == "zfs_ram" else 30.0, "seconds": 0}}
            report.samples.append(ci_job.Sample(rep, system, "unpack", unpack, None, requests))
            report.samples.append(ci_job.Sample(rep, system, "rm", 1.0, None, requests))
    lines = ci_job._against_reference(report)
    table = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(table) == ["unpack", "rm", "total"]
    assert table["unpack"][:2] == ["0.50", "(0.25-1.00)"]  # 0.5, 1.0, 0.25
    assert table["rm"][:2] == ["1.00", "(1.00-1.00)"]
    assert table["total"][:2] == ["0.60", "(0.40-1.00)"]  # 3/5, 4/4, 2/5
    assert table["unpack"][2:] == ["requests", "10", "/", "30"]
    assert table["total"][2:] == ["requests", "20", "/", "60"]  # per repetition
