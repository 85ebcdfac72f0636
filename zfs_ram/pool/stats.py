"""Frozen statistics records of a pool, named as zram and zsmalloc's debugfs name them."""

from __future__ import annotations

from dataclasses import dataclass

from zfs_ram.vocabulary import PAGE_SIZE


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool (zram's mm_stat, plus what userspace can measure besides)."""

    kind: str  #: "zsmalloc" or "zbud"
    pages_used: int  #: frames held by live zspages / zbud pages (zs_get_total_pages)
    max_pages_used: int  #: high-water mark of pages_used since creation or reset_max_pages()
    mem_limit_pages: int  #: 0 = unlimited
    objects: int  #: live objects (handles)
    bytes_stored: int  #: sum of the live objects' sizes (zram's compr_data_size)
    pages_compacted: int  #: frames freed by compaction since creation
    objects_moved: int  #: objects moved by compaction since creation
    bytes_moved: int  #: bytes copied by compaction since creation
    huge_objects: int  #: live objects in the huge class (one frame each)
    freeable_pages: int  #: frames compaction could free now (sum of zs_can_compact)
    metadata_bytes: int  #: Python-side bookkeeping, as measured by metadata_bytes()
    zspages: int  #: live zspages (zbud: live pages)
    free_frames: int  #: frames returned to the OS and kept for reuse
    warm_frames: int  #: freed frames kept resident for the next zspage (at most WARM_FRAMES)
    mapped_bytes: int  #: address space reserved by the arena (not resident by itself)

    @property
    def pool_bytes(self) -> int:
        """Memory the pool holds for data: pages_used * PAGE_SIZE (zram's mem_used_total)."""
        return self.pages_used * PAGE_SIZE

    @property
    def overhead_ratio(self) -> float:
        """pool bytes / stored bytes: 1.0 is perfect packing (0.0 for an empty pool)."""
        return self.pool_bytes / self.bytes_stored if self.bytes_stored else 0.0


@dataclass(frozen=True, slots=True)
class ClassStats:
    """One row of zsmalloc's debugfs `classes` table, for one distinct (merged) class."""

    index: int  #: kernel class index (of the largest size merged into this class)
    size: int  #: slot size in bytes
    #: zspages per fullness bucket, in the kernel's column order 10%,20%,...,90%,99%,100%
    inuse_histogram: tuple[int, ...]
    obj_allocated: int  #: slots in live zspages
    obj_used: int  #: live objects
    pages_used: int  #: frames of live zspages
    pages_per_zspage: int
    objs_per_zspage: int
    freeable: int  #: frames compaction could free in this class (zs_can_compact)
