"""zfs_ram.client.ControlClient against stand-in control directories (no mount needed)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from zfs_ram.client import ControlClient, ControlError, DaemonGone, NoAnswer
from zfs_ram.vocabulary import CONTROL_DIR, MM_STAT_FIELDS


def control_dir(tmp_path: Path, **files: str) -> ControlClient:
    directory = tmp_path / CONTROL_DIR
    directory.mkdir()
    for name, text in files.items():
        (directory / name.replace("_json", ".json")).write_text(text)
    return ControlClient(tmp_path, timeout=0.5)


def test_mm_stat_is_parsed_by_zrams_names(tmp_path: Path) -> None:
    client = control_dir(tmp_path, mm_stat="   4096  100 8192 0 8192 1 2 0 0\n")
    mm = client.mm_stat()
    assert list(mm) == list(MM_STAT_FIELDS)
    assert (mm["orig_data_size"], mm["compr_data_size"], mm["pages_compacted"]) == (4096, 100, 2)


@pytest.mark.parametrize("text", ["1 2 3\n", "a b c d e f g h i\n", ""])
def test_a_malformed_mm_stat_is_one_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ControlError, match="mm_stat of .* is malformed"):
        control_dir(tmp_path, mm_stat=text).mm_stat()


def test_stats_pid_and_mem_limit(tmp_path: Path) -> None:
    client = control_dir(tmp_path, stats_json='{"pid": 7}', pid="7\n", mem_limit="4096\n")
    assert client.stats() == {"pid": 7}
    assert client.pid() == 7
    assert client.mem_limit() == 4096


def test_stats_that_are_not_an_object_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="not an object"):
        control_dir(tmp_path, stats_json="[1]").stats()
    with pytest.raises(ControlError, match="not JSON"):
        _rewrite(tmp_path, "stats.json", "{").stats()


def _rewrite(tmp_path: Path, name: str, text: str) -> ControlClient:
    (tmp_path / CONTROL_DIR / name).write_text(text)
    return ControlClient(tmp_path, timeout=0.5)


def test_a_read_that_blocks_is_no_answer_within_the_timeout(tmp_path: Path) -> None:
    (tmp_path / CONTROL_DIR).mkdir()
    os.mkfifo(tmp_path / CONTROL_DIR / "pid")  # opening a FIFO with no writer blocks
    client = ControlClient(tmp_path, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(NoAnswer) as info:
        client.pid()
    assert time.monotonic() - started < 2
    assert str(info.value) == f"the zfs_ram daemon of {tmp_path} does not answer (stopped or hung)"
    # Unblock the thread left waiting, so it does not outlive the test.
    fd = os.open(tmp_path / CONTROL_DIR / "pid", os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


def test_enotconn_is_daemon_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = control_dir(tmp_path, pid="1\n")

    def dead(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

    monkeypatch.setattr(Path, "read_text", dead)
    with pytest.raises(DaemonGone) as info:
        client.pid()
    assert str(info.value) == f"the zfs_ram daemon of {tmp_path} is gone (use 'zfs-ram umount')"


def test_other_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / CONTROL_DIR).mkdir()
    with pytest.raises(ControlError) as info:
        ControlClient(tmp_path).pid()
    assert not isinstance(info.value, (NoAnswer, DaemonGone))
    assert str(info.value) == (
        f"cannot read {CONTROL_DIR}/pid of {tmp_path}: No such file or directory"
    )


def test_writes_reach_the_file(tmp_path: Path) -> None:
    client = control_dir(tmp_path, mem_limit="0\n", mem_used_max="0\n")
    client.set_mem_limit("50%")
    assert (tmp_path / CONTROL_DIR / "mem_limit").read_text() == "50%\n"
    client.reset_mem_used_max()
    assert (tmp_path / CONTROL_DIR / "mem_used_max").read_text() == "0\n"
