"""mm_stat's one parser: exact for zfs_ram's own file, lenient for a kernel's."""

from __future__ import annotations

import pytest

from zfs_ram.vocabulary import MM_STAT_FIELDS, parse_mm_stat


def test_an_mm_stat_line_by_name() -> None:
    line = " ".join(f"{n:8d}" for n in range(1, len(MM_STAT_FIELDS) + 1)) + "\n"
    assert parse_mm_stat(line) == {name: i for i, name in enumerate(MM_STAT_FIELDS, 1)}


def test_a_kernels_shorter_line_is_accepted_only_when_asked() -> None:
    assert parse_mm_stat("4096 100 8192\n", exact=False) == {
        "orig_data_size": 4096,
        "compr_data_size": 100,
        "mem_used_total": 8192,
    }
    with pytest.raises(ValueError, match="3 columns"):
        parse_mm_stat("4096 100 8192\n")


@pytest.mark.parametrize("line", ["", "1 2", "1 2 x 4", "1 -2 3"])
def test_a_malformed_line_is_refused(line: str) -> None:
    with pytest.raises(ValueError):
        parse_mm_stat(line, exact=False)
