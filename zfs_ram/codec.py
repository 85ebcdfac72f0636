"""One 4 KiB file page <-> the bytes the pool keeps for it.

Three encodings, chosen per page as zram chooses them:
- same-filled: every 8-byte word of the page is equal (zero pages above all); nothing is stored,
  the word is kept in the page table (zram's same_pages);
- compressed: lz4 block format without the stored size (the size is always PAGE_SIZE);
- raw: lz4 did not get the page below the pool's huge watermark, so the page is kept as it is,
  one frame of its own, and reading it costs no decompression (zram's huge pages).
A stored object of exactly PAGE_SIZE bytes is raw; anything shorter is lz4.
"""

from __future__ import annotations

import os
import queue
import threading

import lz4.block

# Re-exported (the `as` form says so to mypy) for the modules that still take it from here.
from zfs_ram.vocabulary import PAGE_SIZE as PAGE_SIZE

WORDS_PER_PAGE = PAGE_SIZE // 8
ZERO_PAGE = bytes(PAGE_SIZE)


def same_filled_word(page: bytes | memoryview) -> int | None:
    """The repeated 8-byte word if the page is one word repeated, else None."""
    first = bytes(page[:8])
    # The last word first, as zram does: most pages differ there and the check costs nothing.
    if page[-8:] != first:
        return None
    if page != first * WORDS_PER_PAGE:
        return None
    return int.from_bytes(first, "little")


def fill_page(word: int) -> bytes:
    """The page that same_filled_word() described by word."""
    if word == 0:
        return ZERO_PAGE
    return word.to_bytes(8, "little") * WORDS_PER_PAGE


def encode_page(
    page: bytes | memoryview, huge_size: int, packed: bytes | None = None
) -> bytes | memoryview | int:
    """What to keep for a full page: its repeated word (an int), else its lz4 output, else
    (lz4 did not get it below huge_size) the raw page. `packed` is the page's lz4 output if
    another thread made it already.

    A page may be a memoryview into the request's buffer: it is copied only if kept raw."""
    word = same_filled_word(page)
    if word is not None:
        return word
    if packed is None:
        packed = lz4.block.compress(page, store_size=False)
    return page if len(packed) >= huge_size else packed


Encoded = bytes | memoryview | int  # a same-filled word, or the object to store


# A write of at least this many pages is compressed by two threads, half each. lz4 releases
# the GIL while it compresses, so a second core helps, but only with work in large batches:
# one hand-off per page costs more than it gains (measured: 0.84x the speed of one thread);
# one per half of a 1 MiB write makes encoding 1.2-1.3x faster, and fs_bench seqwrite_1m on
# a mount 5-10% faster (medians of 7: 187-199 against 179-180 MiB/s), as the writer's own
# copying keeps the second core partly busy.
PARALLEL_MIN_PAGES = 32


class _Helper:
    """The second thread: lz4 over the back half of large writes, one batch at a time. It only
    compresses (the GIL is released inside lz4); the same-filled check and the raw-page
    choice stay in the caller's thread, so that the two threads seldom want the GIL at once."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child gets a thread of its own (threads do not fork)
        self.tasks: queue.SimpleQueue[list[memoryview]] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[list[bytes] | BaseException] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="zfs_ram-lz4", daemon=True).start()

    def _serve(self) -> None:
        compress = lz4.block.compress
        while True:
            pages = self.tasks.get()
            try:
                self.results.put([compress(page, store_size=False) for page in pages])
            except BaseException as error:  # handed back, raised in the caller's thread
                self.results.put(error)


_helper: _Helper | None = None


def encode_pages(pages: list[memoryview], huge_size: int) -> list[Encoded]:
    """encode_page for each page of a write; a large write is compressed by two threads."""
    global _helper
    if len(pages) < PARALLEL_MIN_PAGES:
        return [encode_page(page, huge_size) for page in pages]
    if _helper is None or _helper.pid != os.getpid():
        _helper = _Helper()
    half = len(pages) // 2
    back = pages[half:]
    _helper.tasks.put(back)
    try:
        encoded = [encode_page(page, huge_size) for page in pages[:half]]
    finally:
        packed = _helper.results.get()  # always taken, so that the next write gets its own
    if isinstance(packed, BaseException):
        raise packed
    encoded += [encode_page(page, huge_size, obj) for page, obj in zip(back, packed, strict=True)]
    return encoded


def decode_many(objects: list[bytes]) -> list[bytes]:
    """The pages the objects from encode_page() stand for: a raw page is its own object."""
    decompress = lz4.block.decompress
    # uncompressed_size passed by position: keyword parsing costs 0.17 us of a 0.9 us call.
    return [
        stored if len(stored) == PAGE_SIZE else decompress(stored, PAGE_SIZE) for stored in objects
    ]


def decode(stored: bytes) -> bytes:
    """The page an object from encode_page() stands for. decode_many's rule for one object,
    without building two lists: a random 4 KiB read decodes one page per request."""
    return stored if len(stored) == PAGE_SIZE else lz4.block.decompress(stored, PAGE_SIZE)
