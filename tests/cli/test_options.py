"""Mount option parsing: tmpfs semantics, zfs_ram's own options, what reaches libfuse."""

from __future__ import annotations

import pytest

from zfs_ram.daemon.options import (
    ALWAYS_FUSE_OPTIONS,
    FUSE_FLAGS,
    KERNEL_PERMISSIONS,
    OPTION_TABLE,
    OptionError,
    mem_total_bytes,
    parse_options,
)
from zfs_ram.fs.config import PAGE_SIZE, FsConfig

GIB = 1 << 30
RAM = 8 * GIB  # a fixed machine size, so % and defaults are exact


_USERS = {"alice": 1001}
_GROUPS = {"staff": 50}


def config(text: str) -> FsConfig:
    return parse_options(
        text, mem_total=RAM, uid_of=_USERS.__getitem__, gid_of=_GROUPS.__getitem__
    ).config


def fuse(text: str, *, euid: int = 1000) -> frozenset[str]:
    """What libfuse gets, for a mount made by `euid` (by default not root's)."""
    return parse_options(text, mem_total=RAM, euid=euid).fuse_options


def error(text: str) -> str:
    with pytest.raises(OptionError) as info:
        parse_options(text, mem_total=RAM, uid_of=_USERS.__getitem__, gid_of=_GROUPS.__getitem__)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- size= and mem_limit=


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("size=4096", 4096),
        ("size=1", PAGE_SIZE),  # rounded up to whole pages, as tmpfs does
        ("size=10k", 12 * 1024),
        ("size=10K", 12 * 1024),
        ("size=64m", 64 << 20),
        ("size=2G", 2 * GIB),
        ("size=1t", 1 << 40),
        ("size=25%", RAM // 4),
        ("size=150%", RAM * 3 // 2),  # tmpfs allows oversizing, so do we
        ("size=0", 0),  # no limit
    ],
)
def test_size_accepts_tmpfs_forms(text: str, expected: int) -> None:
    assert config(text).size_bytes == expected


def test_size_defaults_to_half_the_ram() -> None:
    assert config("").size_bytes == RAM // 2


def test_size_percent_is_of_memtotal_and_page_rounded() -> None:
    odd_ram = 1000 * PAGE_SIZE + 123
    cfg = parse_options("size=33%", mem_total=odd_ram).config
    assert cfg.size_bytes % PAGE_SIZE == 0
    assert odd_ram * 33 // 100 <= cfg.size_bytes < odd_ram * 33 // 100 + PAGE_SIZE


@pytest.mark.parametrize("bad", ["size=12q", "size=", "size=-1", "size=1.5g", "size=g", "size=%"])
def test_size_rejects_malformed_values_with_one_line(bad: str) -> None:
    message = error(bad)
    if bad == "size=":
        assert message == "bad mount option 'size=': expected bytes with k/m/g/t suffix or N%"
    assert f"'{bad}'" in message
    assert "k/m/g/t" in message


def test_size_error_message_is_exactly_the_documented_line() -> None:
    assert error("size=12q") == (
        "bad mount option 'size=12q': expected bytes with k/m/g/t suffix or N%"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mem_limit=0", 0),
        ("mem_limit=100m", 100 << 20),
        ("mem_limit=10%", RAM // 10 // PAGE_SIZE * PAGE_SIZE + PAGE_SIZE),
    ],
)
def test_mem_limit(text: str, expected: int) -> None:
    assert config(text).mem_limit_bytes == expected


def test_mem_limit_defaults_to_none() -> None:
    assert config("").mem_limit_bytes == 0


# ---- nr_inodes=, mode=, uid=, gid=


@pytest.mark.parametrize(
    ("text", "expected"), [("nr_inodes=4", 4), ("nr_inodes=10k", 10240), ("nr_inodes=1M", 1 << 20)]
)
def test_nr_inodes(text: str, expected: int) -> None:
    assert config(text).nr_inodes == expected


def test_nr_inodes_defaults_to_half_the_ram_pages_and_zero_means_unlimited() -> None:
    assert config("").nr_inodes == RAM // PAGE_SIZE // 2
    assert config("nr_inodes=0").nr_inodes == 0


@pytest.mark.parametrize("bad", ["nr_inodes=10%", "nr_inodes=x", "nr_inodes=1t"])
def test_nr_inodes_rejects_percent_and_junk(bad: str) -> None:
    assert "k/m/g" in error(bad)


@pytest.mark.parametrize(("text", "expected"), [("mode=700", 0o700), ("mode=1777", 0o1777)])
def test_mode_is_octal(text: str, expected: int) -> None:
    assert config(text).mode == expected


@pytest.mark.parametrize("bad", ["mode=800", "mode=rwx", "mode=17777", "mode="])
def test_mode_rejects_non_octal(bad: str) -> None:
    assert f"'{bad}'" in error(bad)


def test_uid_gid_as_numbers_or_names() -> None:
    cfg = config("uid=1001,gid=50")
    assert (cfg.uid, cfg.gid) == (1001, 50)
    cfg = config("uid=alice,gid=staff")
    assert (cfg.uid, cfg.gid) == (1001, 50)


def test_unknown_user_and_group_are_named() -> None:
    assert error("uid=nobody_here") == "bad mount option 'uid=nobody_here': no such user"
    assert error("gid=nogroup_here") == "bad mount option 'gid=nogroup_here': no such group"


def test_real_user_database_is_used_by_default() -> None:
    cfg = parse_options("uid=root,gid=root", mem_total=RAM).config
    assert (cfg.uid, cfg.gid) == (0, 0)


# ---- zfs_ram's own options


def test_pool_and_compaction_settings() -> None:
    cfg = config("pool=zbud,compact=off,compact_min_pages=8,compact_batch=200")
    assert (cfg.pool, cfg.compact, cfg.compact_min_pages, cfg.compact_batch) == (
        "zbud",
        "off",
        8,
        200,
    )


def test_defaults_are_fsconfigs() -> None:
    cfg = config("")
    assert (cfg.pool, cfg.compact, cfg.fsname) == ("zsmalloc", "auto", "zfs_ram")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("pool=slab", "zsmalloc, zbud"),
        ("compact=sometimes", "auto, off"),
        ("compact_min_pages=0", ">= 1"),
        ("compact_batch=-3", ">= 1"),
        ("compact_batch=lots", ">= 1"),
    ],
)
def test_own_options_reject_bad_values(bad: str, reason: str) -> None:
    assert reason in error(bad)


def test_later_options_override_earlier_ones() -> None:
    assert config("size=1g,size=2g").size_bytes == 2 * GIB


def test_log_is_a_daemon_setting_not_a_fuse_option() -> None:
    parsed = parse_options("log=/tmp/x.log", mem_total=RAM)
    assert parsed.log_path == "/tmp/x.log"
    assert not any(o.startswith("log") for o in parsed.fuse_options)


# ---- what libfuse gets


def test_always_added_fuse_options() -> None:
    assert fuse("") == ALWAYS_FUSE_OPTIONS | {"fsname=zfs_ram", KERNEL_PERMISSIONS}
    assert "subtype=zfs_ram" in fuse("")


def test_the_kernel_checks_permissions_unless_only_root_can_enter() -> None:
    """default_permissions on every mount some other user can enter: a user's own, or any
    with allow_other or allow_root; off on root's own, which only root can enter."""
    assert "default_permissions" in fuse("", euid=1000)
    assert "default_permissions" in fuse("allow_root", euid=1000)
    assert "default_permissions" not in fuse("", euid=0)
    assert "default_permissions" in fuse("allow_other", euid=0)
    assert "default_permissions" in fuse("allow_root", euid=0)


def test_fsname_and_allow_other_go_to_libfuse() -> None:
    opts = fuse("fsname=scratch,allow_other")
    assert "fsname=scratch" in opts
    assert "fsname=zfs_ram" not in opts
    assert "allow_other" in opts
    assert config("fsname=scratch").fsname == "scratch"


def test_fs_options_never_reach_libfuse() -> None:
    opts = fuse("size=1g,nr_inodes=10,mode=700,uid=0,gid=0,mem_limit=1m,pool=zbud,compact=off")
    assert opts == ALWAYS_FUSE_OPTIONS | {"fsname=zfs_ram", KERNEL_PERMISSIONS}


def test_mount_fuse3_style_string_is_accepted() -> None:
    # What mount.fuse3 hands the helper for an fstab line "... defaults,size=1g,nofail 0 0".
    parsed = parse_options("rw,defaults,size=1g,nofail,dev,suid,x-systemd.automount", mem_total=RAM)
    assert {"rw", "dev", "suid"} <= parsed.fuse_options
    assert not {"defaults", "nofail"} & parsed.fuse_options
    assert "x-systemd.automount" in parsed.ignored
    assert parsed.config.size_bytes == GIB


@pytest.mark.parametrize(
    "generic",
    [
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "nofail",
        "_netdev",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "relatime",
        "norelatime",
        "strictatime",
        "nodiratime",
        "diratime",
        "sync",
        "async",
        "dirsync",
        "lazytime",
        "nolazytime",
        "silent",
        "loud",
        "x-gvfs-show",
        "comment=x-foo",
    ],
)
def test_generic_mount_options_are_accepted(generic: str) -> None:
    opts = fuse(generic)
    # Passed on only if libfuse 3.14 accepts it (probed), dropped otherwise.
    assert (generic in opts) == (generic in FUSE_FLAGS)


@pytest.mark.parametrize(
    ("text", "present", "absent"),
    [
        ("rw,ro", "ro", "rw"),
        ("ro,rw", "rw", "ro"),
        ("nosuid,suid", "suid", "nosuid"),
        ("dev,nodev", "nodev", "dev"),
        ("sync,async", "async", "sync"),
        ("noatime,atime", "atime", "noatime"),
    ],
)
def test_later_of_two_opposite_flags_wins(text: str, present: str, absent: str) -> None:
    opts = fuse(text)
    assert present in opts
    assert absent not in opts


@pytest.mark.parametrize(
    ("text", "xattrs"),
    [
        ("", False),
        ("xattr", True),
        ("noxattr", False),
        ("noxattr,xattr", True),
        ("xattr,noxattr", False),
    ],
)
def test_xattr_flags_reach_the_filesystem_not_the_kernel(text: str, xattrs: bool) -> None:
    assert config(text).xattrs is xattrs
    assert not {"xattr", "noxattr"} & fuse(text)


@pytest.mark.parametrize(
    ("text", "noatime"),
    [("", False), ("noatime", True), ("noatime,relatime", False), ("strictatime,noatime", True)],
)
def test_atime_policy_reaches_the_filesystem(text: str, noatime: bool) -> None:
    assert config(text).noatime is noatime
    assert ("noatime" in fuse(text)) is noatime


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("bogus", "bad mount option 'bogus': unknown option"),
        ("huge=always", "bad mount option 'huge=always': unknown option"),
        ("size", "bad mount option 'size': needs a value"),
        ("subtype=other", "bad mount option 'subtype=other': the subtype is always zfs_ram"),
        ("fsname=", "bad mount option 'fsname=': expected a non-empty name"),
        ("allow_other,allow_root", "bad mount option 'allow_root': cannot be combined"),
        ("read_ahead_kb", "bad mount option 'read_ahead_kb': needs a value"),
        ("read_ahead_kb=1m", "bad mount option 'read_ahead_kb=1m': expected an integer >= 0"),
        ("read_ahead_kb=65537", "bad mount option 'read_ahead_kb=65537': expected KiB up to"),
    ],
)
def test_errors_name_the_option_and_the_reason(bad: str, expected: str) -> None:
    assert error(bad).startswith(expected)


def test_daemon_settings_parse() -> None:
    assert parse_options("read_ahead_kb=0", mem_total=RAM).read_ahead_kb == 0
    assert parse_options("", mem_total=RAM).read_ahead_kb == 1024
    assert "read_ahead_kb=0" not in fuse("read_ahead_kb=0")  # the daemon's, not libfuse's


def test_empty_items_are_skipped() -> None:
    assert config(",,size=1g,").size_bytes == GIB


def test_mem_total_reads_meminfo(tmp_path: object) -> None:
    assert mem_total_bytes() > 0
    fake = f"{tmp_path}/meminfo"
    with open(fake, "w") as f:
        f.write("MemTotal:       1000 kB\nMemFree:         10 kB\n")
    assert mem_total_bytes(fake) == 1000 * 1024


def test_remount_is_refused_as_unsupported_not_unknown() -> None:
    message = error("remount,size=2g")
    assert message.startswith("bad mount option 'remount': remount is not supported (")
    assert "unknown" not in message


def test_sizes_share_the_control_files_syntax_but_no_spaces() -> None:
    assert config("mem_limit=1G").mem_limit_bytes == GIB
    assert (
        error("size=1 g") == "bad mount option 'size=1 g': expected bytes with k/m/g/t suffix or N%"
    )
    assert "more than any machine has" in error("size=99999999t")


def test_the_help_table_lists_every_option_the_parser_knows() -> None:
    from zfs_ram.daemon import options

    listed: set[str] = set()
    for spelling, _, _ in options.OPTION_TABLE:
        for word in spelling.replace(",", "|").split("|"):
            word = word.strip().split("=")[0]
            listed |= {word.replace("[no]", ""), word.replace("[no]", "no")}
    known = set(options._VALUED) - {"subtype"} | set(options.FUSE_FLAGS)
    known |= set(options._ATIME_FLAGS) | {"xattr", "noxattr"}
    assert known <= listed, known - listed
    for spelling, default, meaning in options.OPTION_TABLE:
        assert default and meaning, spelling


def test_the_help_tables_defaults_are_what_parsing_nothing_gives() -> None:
    table = {spelling.split("=")[0]: default for spelling, default, _ in OPTION_TABLE}
    cfg = config("")
    assert table["mode"] == f"{cfg.mode:o}"
    assert table["pool"] == cfg.pool
    assert table["compact"] == cfg.compact
    assert table["compact_min_pages"] == str(cfg.compact_min_pages)
    assert table["compact_batch"] == str(cfg.compact_batch)
    assert table["fsname"] == cfg.fsname
    assert table["xattr|noxattr"] == ("xattr" if cfg.xattrs else "noxattr")
    # libfuse mounts nosuid,nodev unless told suid/dev; the parser passes neither by default.
    assert not {"suid", "dev"} & fuse("")
