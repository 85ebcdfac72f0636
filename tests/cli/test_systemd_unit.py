"""examples/zfs-ram@.service starts `zfs-ram mount -f DIR` with options that parse."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import VENV_BIN

from zfs_ram.cli import build_parser
from zfs_ram.daemon.options import parse_options

UNIT = Path(__file__).resolve().parents[2] / "examples" / "zfs-ram@.service"
MOUNTPOINT = "/mnt/scratch"  # what %f expands to for the instance mnt-scratch


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def exec_start() -> list[str]:
    """ExecStart as systemd runs it for the instance of /mnt/scratch, with the default options."""
    service = unit()["Service"]
    key, _, default = service["Environment"].partition("=")
    line = service["ExecStart"].replace("%f", MOUNTPOINT).replace("${" + key + "}", default)
    return shlex.split(line)


def test_the_unit_is_a_notify_service_per_mountpoint() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert "%f" in service["ExecStart"]
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_exec_start_runs_zfs_ram_mount_in_the_foreground_with_options_that_parse() -> None:
    argv = exec_start()
    program = Path(argv[0])
    assert program.name == "zfs-ram"
    assert (VENV_BIN / program.name).exists()  # the installed command the unit links to
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.mountpoint, args.foreground) == ("mount", MOUNTPOINT, True)
    parse_options(",".join(args.options))  # raises OptionError if they did not parse


def test_the_instance_name_is_the_escaped_path() -> None:
    if shutil.which("systemd-escape") is None:
        pytest.skip("needs systemd-escape")
    escaped = subprocess.run(
        ["systemd-escape", "--path", MOUNTPOINT], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert escaped == "mnt-scratch"
    back = subprocess.run(
        ["systemd-escape", "--unescape", "--path", escaped],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert back == MOUNTPOINT  # what %f gives the unit
