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

import lz4.block

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8
ZERO_PAGE = bytes(PAGE_SIZE)


def same_filled_word(page: bytes) -> int | None:
    """The repeated 8-byte word if the page is one word repeated, else None."""
    first = page[:8]
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


def encode(page: bytes, huge_size: int) -> bytes:
    """The object to store for a full page: lz4 output, or the raw page if that is >= huge_size."""
    packed: bytes = lz4.block.compress(page, store_size=False)
    if len(packed) >= huge_size:
        return page
    return packed


def decode(stored: bytes) -> bytes:
    """The page an object from encode() stands for."""
    if len(stored) == PAGE_SIZE:
        return stored
    page: bytes = lz4.block.decompress(stored, uncompressed_size=PAGE_SIZE)
    return page
