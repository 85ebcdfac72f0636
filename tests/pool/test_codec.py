"""The page codec: what each kind of page becomes, in one thread or two."""

from __future__ import annotations

import os
import random

import pytest

from zfs_ram import codec

PAGE = codec.PAGE_SIZE
HUGE = 3633


def mixed_pages(count: int, seed: int) -> list[memoryview]:
    rng = random.Random(seed)
    pages = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            pages.append(bytes(PAGE))  # zero: same-filled, word 0
        elif kind == 1:
            pages.append(rng.randbytes(8) * (PAGE // 8))  # same-filled
        elif kind == 2:
            pages.append(rng.randbytes(PAGE))  # incompressible: kept raw
        else:
            pages.append(b"".join(rng.choice([b"ab", b"cd", b"ef "]) for _ in range(PAGE))[:PAGE])
    return [memoryview(b"".join(pages))[i * PAGE : (i + 1) * PAGE] for i in range(count)]


def serial(pages: list[memoryview]) -> list[codec.Encoded]:
    return [codec.encode_page(page, HUGE) for page in pages]


def as_comparable(encoded: list[codec.Encoded]) -> list[object]:
    return [e if isinstance(e, int) else bytes(e) for e in encoded]


@pytest.mark.parametrize(
    "count",
    [1, codec.PARALLEL_MIN_PAGES - 1, codec.PARALLEL_MIN_PAGES, codec.PARALLEL_MIN_PAGES + 1, 256],
)
def test_two_threads_encode_as_one(count: int) -> None:
    pages = mixed_pages(count, count)
    encoded = codec.encode_pages(pages, HUGE)
    assert as_comparable(encoded) == as_comparable(serial(pages))
    for page, item in zip(pages, encoded, strict=True):
        if isinstance(item, int):
            assert codec.fill_page(item) == page
        else:
            assert codec.decode(bytes(item)) == page


def test_the_helper_thread_is_remade_after_fork() -> None:
    pages = mixed_pages(64, 1)
    expected = as_comparable(serial(pages))
    assert as_comparable(codec.encode_pages(pages, HUGE)) == expected  # helper started here
    pid = os.fork()
    if pid == 0:  # the child has no helper thread; a stale one would hang the write forever
        ok = as_comparable(codec.encode_pages(pages, HUGE)) == expected
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_error_in_the_helper_reaches_the_caller_and_the_next_write_works() -> None:
    pages = mixed_pages(64, 2)
    bad = pages[:40] + [object()] * 24  # type: ignore[list-item]
    with pytest.raises(TypeError):
        codec.encode_pages(bad, HUGE)
    assert as_comparable(codec.encode_pages(pages, HUGE)) == as_comparable(serial(pages))
