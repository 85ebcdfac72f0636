"""The invariant checker of the zsmalloc pool: every zspage, list, slot and handle, walked.

Kept apart from zsmalloc.py because nothing on the allocator's paths calls it: tests call it
after every step (and zfs_ram.testing exposes it through Pool.check). It reads the pool's
internal arrays directly, as a debugfs walk would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import LIVE, Pool
from .errors import PoolCorruptionError

if TYPE_CHECKING:
    from .zsmalloc import ZsmallocPool


def check_zsmalloc(pool: ZsmallocPool) -> None:
    """Verify every zspage, list, slot and handle; raise PoolCorruptionError if any is off."""
    from .zsmalloc import (
        HUGE_CID,
        NOFRAME,
        NR_GROUPS,
        POUR_SLACK_PERCENT,
        UNUSED,
        obj_to_location,
    )

    pool._check_common()
    if pool._structures_bytes() != Pool._structures_bytes(pool):
        raise PoolCorruptionError("a class's cached structures_bytes is stale")
    if pool._zspages != sum(c.zspages for c in pool._compact_order):
        raise PoolCorruptionError(f"zspages counter {pool._zspages} wrong")
    hloc = pool.hloc
    owner: dict[int, str] = {}
    used_handles = 0
    total_bytes = 0
    pages = 0

    def own(frame: int, who: str) -> None:
        if frame >= pool.arena.frames_created:
            raise PoolCorruptionError(f"{who} owns never-created frame {frame}")
        if frame in owner:
            raise PoolCorruptionError(f"frame {frame} owned by {owner[frame]} and {who}")
        owner[frame] = who

    for f in pool.arena.unused_frames():
        own(f, "the free lists")
    for c in pool._classes:
        if c.huge:
            continue
        n, p = c.objs, c.pages
        nz = len(c.inuse)
        for arr in (c.freeobj, c.group, c.prev, c.next):
            if len(arr) != nz:
                raise PoolCorruptionError(f"class {c.size}: per-zspage arrays differ in length")
        if len(c.frames) != nz * p or len(c.slots) != nz * n:
            raise PoolCorruptionError(f"class {c.size}: frame/slot arrays have wrong length")
        # fullness lists
        on_list: set[int] = set()
        for g in range(NR_GROUPS):
            z = c.heads[g]
            if (z >= 0) != bool(c.mask >> g & 1):
                raise PoolCorruptionError(f"class {c.size}: mask bit {g} wrong")
            prev = -1
            while z >= 0:
                if z in on_list or z >= nz:
                    raise PoolCorruptionError(f"class {c.size}: list {g} broken at {z}")
                if c.prev[z] != prev:
                    raise PoolCorruptionError(f"class {c.size}: zspage {z} bad prev link")
                if c.group[z] != g:
                    raise PoolCorruptionError(f"class {c.size}: zspage {z} on wrong list")
                on_list.add(z)
                prev, z = z, c.next[z]
        free_zs = set(c.free_zs)
        if len(free_zs) != len(c.free_zs):
            raise PoolCorruptionError(f"class {c.size}: zspage number freed twice")
        live = {z for z in range(nz) if c.group[z] != UNUSED}
        if live != on_list or free_zs != set(range(nz)) - live:
            raise PoolCorruptionError(f"class {c.size}: live zspages, lists, free set differ")
        if len(live) != c.zspages:
            raise PoolCorruptionError(f"class {c.size}: zspages counter wrong")
        used = 0
        frames_here = 0
        for z in live:
            k = c.inuse[z]
            if not 0 < k <= n or c.group[z] != c.group_of[k]:
                raise PoolCorruptionError(f"class {c.size}: zspage {z} inuse {k} bad")
            for f in c.frames[z * p : z * p + p]:
                if f != NOFRAME:
                    own(f, f"class {c.size} zspage {z}")
                    frames_here += 1
            # free-slot list
            seen: set[int] = set()
            s = c.freeobj[z]
            while s >= 0:
                if s >= n or s in seen:
                    raise PoolCorruptionError(f"class {c.size}: zspage {z} free list broken")
                sw = c.slots[z * n + s]
                if sw & LIVE:
                    raise PoolCorruptionError(f"class {c.size}: allocated slot on free list")
                seen.add(s)
                s = (sw >> 1) - 1
            if len(seen) != n - k:
                raise PoolCorruptionError(f"class {c.size}: zspage {z} free-slot count wrong")
            for s in range(n):
                sw = c.slots[z * n + s]
                if not sw & LIVE:
                    if s not in seen:
                        raise PoolCorruptionError(f"class {c.size}: slot neither used nor free")
                    continue
                off = s * c.size
                for fk in {off >> 12, (off + c.size - 1) >> 12}:
                    if c.frames[z * p + fk] == NOFRAME:
                        raise PoolCorruptionError(f"class {c.size}: slot ({z},{s}) no frame")
                h = sw >> 1
                w = hloc[h] if h < len(hloc) else 0
                wcid, wz, ws, size = obj_to_location(w)
                if not w & LIVE or (wcid, wz, ws) != (c.cid, z, s):
                    raise PoolCorruptionError(
                        f"class {c.size}: slot ({z},{s}) -> handle {h} does not map back"
                    )
                # An object lives in its own class, or was poured up into a larger one at most
                # POUR_SLACK_PERCENT larger than itself (class ids count from the largest down).
                own_cid = pool._cid_of_size[size]
                if own_cid != c.cid and (
                    own_cid < c.cid or c.size * 100 > size * (100 + POUR_SLACK_PERCENT)
                ):
                    raise PoolCorruptionError(f"handle {h}: size {size} not in class {c.size}")
                total_bytes += size
            used += k
        if used != c.obj_used:
            raise PoolCorruptionError(f"class {c.size}: obj_used {c.obj_used} != {used}")
        used_handles += used
        if frames_here != c.frames_used:
            raise PoolCorruptionError(f"class {c.size}: frames_used {c.frames_used} wrong")
        pages += frames_here
    huge = 0
    for h in range(1, len(hloc)):
        w = hloc[h]
        if not w & LIVE:
            continue
        cid, frame, slot, size = obj_to_location(w)
        if cid == HUGE_CID:
            if slot:
                raise PoolCorruptionError(f"huge handle {h} has a slot")
            if size < pool._huge_size:
                raise PoolCorruptionError(f"huge handle {h} of {size} bytes")
            own(frame, f"huge handle {h}")
            huge += 1
            total_bytes += size
    hc = pool._classes[HUGE_CID]
    if not huge == pool.huge_objects == hc.obj_used == hc.zspages:
        raise PoolCorruptionError(f"huge object counters disagree ({huge} found)")
    if used_handles + huge != pool.objects:
        raise PoolCorruptionError("live handles not all reachable from zspages")
    if pages + huge != pool.pages_used:
        raise PoolCorruptionError(f"pages_used {pool.pages_used} != {pages + huge} owned")
    if len(owner) != pool.arena.frames_created:
        raise PoolCorruptionError("a frame is neither in use nor free")
    if total_bytes != pool.bytes_stored:
        raise PoolCorruptionError(f"bytes_stored {pool.bytes_stored} != {total_bytes}")
