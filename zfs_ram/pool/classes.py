"""zsmalloc's size-class table, computed the way Linux 6.18 computes it.

The kernel derives everything from three numbers: the page size, the class spacing and the
longest zspage chain. We do the same, so the table (and the merging of neighbouring classes
into about 119 distinct ones) matches `zs_create_pool()` for 4 KiB pages and chain size 8.

One deliberate difference: the kernel adds an 8-byte handle header to every request before
looking up its class (`ZS_HANDLE_SIZE`); we keep the reverse map out of line, so a request of
`size` bytes goes to the class that holds `size` bytes. That shifts the huge watermark from the
kernel's 3625 to 3633 (the smallest request that no longer fits the largest multi-object class,
3632 B).
"""

from __future__ import annotations

from dataclasses import dataclass

# The frame size is the kernel's PAGE_SIZE, and the filesystem's page size: one definition.
from zfs_ram.vocabulary import PAGE_SIZE

#: CONFIG_ZSMALLOC_CHAIN_SIZE default: the most frames one zspage may chain together.
MAX_PAGES_PER_ZSPAGE = 8
#: ZS_MIN_ALLOC_SIZE on 64-bit: smaller requests are rounded up to 32 bytes.
MIN_ALLOC_SIZE = 32
#: ZS_MAX_ALLOC_SIZE: an object never exceeds one page.
MAX_ALLOC_SIZE = PAGE_SIZE
#: ZS_SIZE_CLASS_DELTA = PAGE_SIZE >> CLASS_BITS(8): classes are 16 bytes apart.
CLASS_DELTA = PAGE_SIZE >> 8
#: ZS_SIZE_CLASSES: 255 classes from 32 to 4096 bytes.
NUM_CLASSES = -(-(MAX_ALLOC_SIZE - MIN_ALLOC_SIZE) // CLASS_DELTA) + 1


@dataclass(frozen=True, slots=True)
class SizeClass:
    """One distinct (merged) class: all requests whose kernel index lies in `indices`."""

    index: int  #: kernel class index of the class's own (largest) size
    size: int  #: slot size in bytes
    pages_per_zspage: int
    objs_per_zspage: int
    huge: bool  #: one object per one-frame zspage (the kernel's ZsHugePage)


def class_index(size: int) -> int:
    """Kernel `get_size_class_index()`: the index of the class a request of `size` bytes needs."""
    if size <= MIN_ALLOC_SIZE:
        return 0
    return min(-(-(size - MIN_ALLOC_SIZE) // CLASS_DELTA), NUM_CLASSES - 1)


def chain_size(size: int, max_pages: int = MAX_PAGES_PER_ZSPAGE) -> int:
    """Kernel `calculate_zspage_chain_size()`: frames per zspage with the least tail waste.

    Powers of two fit one page exactly; otherwise the smallest chain with the least
    `(n * PAGE_SIZE) % size` wins (strict `<`, so ties keep the shorter chain).
    """
    if size & (size - 1) == 0:
        return 1
    best_pages, best_waste = 1, PAGE_SIZE % size
    for pages in range(2, max_pages + 1):
        waste = (pages * PAGE_SIZE) % size
        if waste < best_waste:
            best_pages, best_waste = pages, waste
    return best_pages


def build_classes(
    max_pages: int = MAX_PAGES_PER_ZSPAGE,
) -> tuple[list[SizeClass], list[SizeClass], int]:
    """Build the table as `zs_create_pool()` does.

    Returns (distinct classes from largest to smallest, a 255-entry list mapping every kernel
    index to its distinct class, the huge watermark in request bytes). Classes are visited from
    the largest down; one whose (pages, objects) equals the previously created class's is merged
    into it (`can_merge`), so its requests round up to the larger slot.
    """
    distinct: list[SizeClass] = []
    by_index: list[SizeClass | None] = [None] * NUM_CLASSES
    huge_watermark = 0
    prev: SizeClass | None = None
    for i in range(NUM_CLASSES - 1, -1, -1):
        size = min(MIN_ALLOC_SIZE + i * CLASS_DELTA, MAX_ALLOC_SIZE)
        pages = chain_size(size, max_pages)
        objs = pages * PAGE_SIZE // size
        if huge_watermark == 0 and pages != 1 and objs != 1:
            # The first class (from the top) that packs objects is the last non-huge one;
            # anything larger than its slot is huge. The kernel subtracts its header here.
            huge_watermark = size + 1
        if prev is not None and prev.pages_per_zspage == pages and prev.objs_per_zspage == objs:
            by_index[i] = prev
            continue
        cls = SizeClass(i, size, pages, objs, huge=(pages == 1 and objs == 1))
        distinct.append(cls)
        by_index[i] = cls
        prev = cls
    table = [c for c in by_index if c is not None]
    assert len(table) == NUM_CLASSES
    return distinct, table, huge_watermark
