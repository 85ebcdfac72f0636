"""Pouring and packing: what userspace adds to zsmalloc's compaction (zsmalloc.py calls these).

Once a class has no whole zspage's worth of free slots, the kernel's compaction stops: the last
partly used zspages stay, up to pages_per_zspage frames each, in every class (after a mass
delete that is most of what is left above the data: 1.08-1.2 mem/compr at 90 %). Pouring moves
the objects of a class's emptiest zspage, in slot order, into free slots of larger classes
whose frames are already made (so a move never costs a frame), nearest class first and at most
POUR_SLACK_PERCENT larger than the object; the handle word names the new class and keeps the
object's size, so an object's size may be below its class's (check() knows the bound). A
zspage poured empty is freed; then every partly used zspage of the class gives back the frames
no live slot reaches into (trim). Objects only ever move up, so pouring ends.

Packing (pack_zspages, and Pool.pack_handle_table for the handle table) gives back the tables'
peak length once a compaction pass has settled the pool.

The compiled engine (_zsmalloc.c: pour, pour_target, trim_class, pack_zspages, pack_handles)
follows these step for step, like the rest of zsmalloc.py.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from .base import LIVE, TABLE_SLACK_DIVISOR
from .zsmalloc import _PARTIAL as PARTIAL
from .zsmalloc import (
    _ZS_SHIFT,
    FULL_GROUP,
    HUGE_CID,
    NOFRAME,
    POUR_SLACK_PERCENT,
    UNUSED,
    location_to_obj,
    obj_size,
)

if TYPE_CHECKING:
    from .zsmalloc import ZsmallocPool, _Class


def pour(pool: ZsmallocPool, c: _Class, budget: int) -> int:
    """Pour class c's emptiest zspages into larger classes until no object finds a place or
    the budget is spent; then trim c's partly used zspages. Returns the objects moved."""
    n = c.objs
    hloc = pool.hloc
    moved = 0
    nbytes = 0
    src = -1
    s = 0
    while moved < budget:
        part = c.mask & PARTIAL
        if not part:
            break
        z = c.heads[(part & -part).bit_length() - 1]
        if z != src:
            src, s = z, 0
        slots = c.slots
        while not slots[src * n + s] & LIVE:
            s += 1
        sw = slots[src * n + s]
        h = sw >> 1
        w = hloc[h]
        size = obj_size(w)
        target = pour_target(pool, c, size)
        if target is None:
            break
        d, dz, ds, prev = target
        data = pool._get(w)
        dslots = d.slots
        di = dz * d.objs
        link = dslots[di + ds]  # take slot ds off dz's free list
        if prev < 0:
            d.freeobj[dz] = (link >> 1) - 1
        else:
            dslots[di + prev] = link
        dslots[di + ds] = sw
        d.inuse[dz] += 1
        d.obj_used += 1
        d.fix_fullness_group(dz)
        nw = location_to_obj(dz, ds, d.cid, size)
        pool._put(nw, data, size)
        hloc[h] = nw  # the handle now names the new location: the move is complete
        slots[src * n + s] = (c.freeobj[src] + 1) << 1
        c.freeobj[src] = s
        c.inuse[src] -= 1
        c.obj_used -= 1
        moved += 1
        nbytes += size
        s += 1
        if c.inuse[src] == 0:
            pool._credit(pool._free_zspage(c, src))
            src = -1
        else:
            c.fix_fullness_group(src)
    pool.bytes_moved += nbytes
    if c.zspages:
        trim(pool, c)
    return moved


def pour_target(pool: ZsmallocPool, c: _Class, size: int) -> tuple[_Class, int, int, int] | None:
    """Where an object of `size` bytes from class c may go: (class, zspage, slot, the slot
    before it on the free list or -1), in the nearest larger class within the slack bound,
    its fullest partly used zspage first, the first free slot whose frames are made."""
    limit = size * (100 + POUR_SLACK_PERCENT) // 100
    classes = pool._classes
    for cid in range(c.cid - 1, HUGE_CID, -1):
        d = classes[cid]
        if d.size > limit:
            break
        part = d.mask & PARTIAL
        while part:
            g = part.bit_length() - 1
            part ^= 1 << g
            z = d.heads[g]
            while z >= 0:
                prev = -1
                s = d.freeobj[z]
                while s >= 0:
                    if not pool._missing_frames(d, z, s):
                        return d, z, s, prev
                    prev = s
                    s = (d.slots[z * d.objs + s] >> 1) - 1
                z = d.next[z]
    return None


def trim(pool: ZsmallocPool, c: _Class) -> None:
    """Give back every frame of c's partly used zspages that no live slot reaches into
    (groups from the emptiest, each list from its head, frames in chain order). A later
    allocation into a slot there makes the frame again, as for a fresh zspage."""
    n, p, size = c.objs, c.pages, c.size
    slots, frames = c.slots, c.frames
    free = pool.arena.free
    freed = 0
    for g in range(1, FULL_GROUP):
        z = c.heads[g]
        while z >= 0:
            for k in range(p):
                f = frames[z * p + k]
                if f == NOFRAME:
                    continue
                lo = (k << 12) // size
                hi = min((((k + 1) << 12) - 1) // size, n - 1)
                base = z * n
                if not any(slots[base + s] & LIVE for s in range(lo, hi + 1)):
                    frames[z * p + k] = NOFRAME
                    free(f)
                    freed += 1
            z = c.next[z]
    if freed:
        c.frames_used -= freed
        pool.pages_used -= freed
        pool._credit(freed)


def pack_zspages(pool: ZsmallocPool, c: _Class) -> None:
    """Renumber c's live zspages into its lowest numbers and cut its per-zspage arrays to
    them, if at least 1/TABLE_SLACK_DIVISOR of the numbers are free: the highest live zspage
    moves into the lowest free number, until none is left above a free one. A moved zspage's
    objects get their handle words rewritten (the zspage number is in them), as a migration
    would; nothing else changes, not a frame, slot or list position."""
    nz = len(c.inuse)
    if not c.free_zs or len(c.free_zs) * TABLE_SLACK_DIVISOR < nz:
        return
    free = sorted(c.free_zs)
    lo = 0
    top = nz - 1
    while lo < len(free) and free[lo] < top:
        if c.group[top] == UNUSED:
            top -= 1
            continue
        renumber(pool, c, top, free[lo])
        lo += 1
        top -= 1
    while top >= 0 and c.group[top] == UNUSED:
        top -= 1
    nz = top + 1
    p, n = c.pages, c.objs
    # Copies, not slices in place: an array keeps its capacity when it shrinks.
    c.frames = c.frames[: nz * p]
    c.slots = c.slots[: nz * n]
    c.inuse = c.inuse[:nz]
    c.freeobj = c.freeobj[:nz]
    c.group = c.group[:nz]
    c.prev = c.prev[:nz]
    c.next = c.next[:nz]
    c.free_zs = array("i")
    c.structures_bytes = -1


def renumber(pool: ZsmallocPool, c: _Class, z: int, t: int) -> None:
    """Move live zspage z of class c to the free number t: its entries, its place on its
    fullness list, and the zspage field of its objects' handle words."""
    p, n = c.pages, c.objs
    c.frames[t * p : t * p + p] = c.frames[z * p : z * p + p]
    c.slots[t * n : t * n + n] = c.slots[z * n : z * n + n]
    c.inuse[t] = c.inuse[z]
    c.freeobj[t] = c.freeobj[z]
    g = c.group[z]
    c.group[t] = g
    before, after = c.prev[z], c.next[z]
    c.prev[t] = before
    c.next[t] = after
    if before >= 0:
        c.next[before] = t
    else:
        c.heads[g] = t
    if after >= 0:
        c.prev[after] = t
    c.group[z] = UNUSED
    hloc = pool.hloc
    keep = (1 << _ZS_SHIFT) - 1
    for sw in c.slots[t * n : t * n + n]:
        if sw & LIVE:
            h = sw >> 1
            hloc[h] = hloc[h] & keep | t << _ZS_SHIFT
