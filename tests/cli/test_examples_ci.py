"""examples/ci-scratch.sh and examples/fstab do what their comments promise."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import cli_env, requires_fuse, run_mount8

from zfs_ram.daemon.lifecycle import find_mount

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "ci-scratch.sh"
MM_STAT = re.compile(r"^mm_stat:((?:\s+\d+){9})$", re.MULTILINE)


def run_script(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ci-scratch.sh with scratch dirs under tmp_path; return the result and mountpoint."""
    env = cli_env()
    env["TMPDIR"] = str(tmp_path)
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
        check=False,
    )
    match = re.search(r"^scratch: (\S+) ", result.stdout, re.MULTILINE)
    assert match, result.stdout + result.stderr
    return result, Path(match.group(1))


@requires_fuse
def test_ci_scratch_demo_job(tmp_path: Path) -> None:
    result, mnt = run_script(tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "crc32 written" in result.stdout
    written, read = re.findall(r"crc32 written (\w+) read (\w+)", result.stdout)[0]
    assert written == read
    assert "venv python 3." in result.stdout
    stats = MM_STAT.search(result.stdout)
    assert stats, result.stdout
    orig_data_size = int(stats.group(1).split()[0])
    assert orig_data_size > 0  # the venv is still there when the statistics are printed
    assert "COMP-RATIO" in result.stdout
    assert find_mount(str(mnt)) is None
    assert not mnt.exists()  # the script removed its scratch directories


@requires_fuse
def test_ci_scratch_runs_a_command_and_keeps_its_failure(tmp_path: Path) -> None:
    result, mnt = run_script(
        "sh",
        "-c",
        'test "$PWD" = "$SCRATCH" && head -c 100000 /dev/zero > z && exit 7',
        tmp_path=tmp_path,
    )
    assert result.returncode == 7, result.stdout + result.stderr
    stats = MM_STAT.search(result.stdout)
    assert stats, result.stdout
    fields = [int(v) for v in stats.group(1).split()]
    assert fields[0] == 25 * 4096  # orig_data_size: 100000 bytes are 25 pages
    assert fields[5] == 25  # same_pages: all zero, the last page zero-padded past EOF
    assert find_mount(str(mnt)) is None


def test_fstab_example_is_one_fuse_zfs_ram_line() -> None:
    lines = [
        line.split()
        for line in (EXAMPLES / "fstab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    source, mountpoint, fstype, options, dump, passno = lines[0]
    assert (source, fstype, dump, passno) == ("zfs_ram", "fuse.zfs_ram", "0", "0")
    assert "size=" in options
    assert "noauto" in options.split(",")


@requires_fuse
def test_fstab_example_mounts(tmp_path: Path, mountpoint: Path) -> None:
    text = (EXAMPLES / "fstab").read_text().replace("/mnt/scratch", str(mountpoint))
    fstab = tmp_path / "fstab"
    fstab.write_text(text)
    facts = run_mount8(f'mount --fstab "{fstab}" "$MNT"', mountpoint, tmp_path)
    assert facts["fstype"] == "fuse.zfs_ram"
    assert int(facts["blocks"]) * int(facts["bsize"]) == 1 << 30  # size=1g
    assert facts["mode"] == "1777"
