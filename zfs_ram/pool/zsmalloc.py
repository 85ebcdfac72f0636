"""zsmalloc in userspace: size classes, zspages, stable handles, fullness groups, compaction.

A re-implementation of Linux 6.18 mm/zsmalloc.c (4 KiB pages, chain size 8) over the frames of a
`FrameArena`. What follows the kernel: the 255 size classes merged into 119, the chain length of
each class, objects laid back to back over a zspage's frames (so an object may straddle two
frames that need not be adjacent), handle indirection so objects can move, the 12 fullness
groups, "allocate into the fullest non-full zspage", "free a zspage when its last object dies",
and __zs_compact's policy (pour the emptiest zspage into the fullest, classes from the largest
down, huge class skipped, stop when zs_can_compact() is 0).

What differs, because userspace allows it:
  * No 8-byte handle header inside objects: the reverse map slot -> handle lives out of line,
    so requests are not inflated and the huge watermark is 3633 instead of 3625.
  * Huge objects (>= huge_class_size) have no zspage at all: the handle names its frame.
  * Compaction is incremental (`compact_step(max_objects)`) so an async caller can yield.
  * After the kernel's pass, compaction pours each class's last partly used zspages into free
    slots of larger classes and trims frames no live slot reaches into (zsmalloc_pour.py), so
    an object may live in a class up to POUR_SLACK_PERCENT larger than its own; once a pass
    settles the pool, the tables are packed (zspages renumbered low, handle table cut).
  * Every byte of bookkeeping is in packed arrays, measured by metadata_bytes().
  * Frames are made lazily: a zspage gets its k-th frame only when a slot first reaches into it,
    so the one partly filled zspage per class holds only the frames it uses (the kernel
    allocates all pages_per_zspage pages up front). pages_used counts frames actually held.

Data layout. Each distinct non-huge class owns parallel arrays indexed by a class-local zspage
number L (reused through `free_zs`):
    frames[L*pages + k]   frame number of the zspage's k-th frame, NOFRAME until first needed
    slots[L*objs + s]     slot s: (handle << 1) | 1 if allocated, else (next_free + 1) << 1
                          (0 ends the zspage's free-slot list); kernel: struct link_free
    inuse[L], freeobj[L]  live objects, head of the free-slot list (-1 = full)
    group[L]              fullness group 0..11, or UNUSED if L is not a live zspage
    prev[L], next[L]      intrusive doubly-linked fullness list (-1 = none)
The handle table entry of a live object (see base.py) is
    L << 31 | slot << 21 | class id << 13 | (size - 1) << 1 | 1
and for a huge object `frame << 31` replaces L and slot (class id HUGE_CID).

Invariants (all verified by check()):
  * A live zspage has 1 <= inuse <= objs and sits on exactly the fullness list
    heads[group_of[inuse]]; `mask` has bit g set iff heads[g] != -1. A zspage whose inuse drops
    to 0 is freed at once, its frames given back to the OS.
  * Slot s of zspage L is allocated iff its word has bit 0; then hloc[handle] decodes to
    (class, L, s) and the object's size belongs to this class, or the class is at most
    POUR_SLACK_PERCENT larger than the object (it was poured there). The free slots form one acyclic
    list from freeobj[L] of length objs - inuse.
  * Every frame is owned by exactly one live zspage, one huge object, or the arena's free list;
    pages_used counts the owned ones. The frames an allocated slot spans are never NOFRAME.
  * obj_used == sum(inuse) and zspages == number of live L, per class.
Concurrency: none. Calls are synchronous and run to completion; a compact_step() is atomic
with respect to the caller, so readers never see a half-moved object.

This is also the reference of the compiled engine (_zsmalloc.c, wrapped by native.py), which
follows it step for step: tests/pool/test_pool_engines.py drives both with the same random steps
and compares handles, bytes, statistics and these tables. A change here is a change there.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

from zfs_ram.vocabulary import PAGE_SHIFT, PAGE_SIZE

from .base import LIVE, BytesLike, Pool
from .classes import SizeClass, build_classes, class_index
from .errors import InvalidSizeError, PoolCorruptionError, PoolFullError
from .frames import SEGMENT_MASK, SEGMENT_SHIFT
from .stats import ClassStats

# Handle-table word fields (bit 0 is LIVE).
_SIZE_SHIFT = 1
_SIZE_MASK = 0xFFF  #: size - 1 in 12 bits: sizes 1..4096
_CID_SHIFT = 13
_CID_MASK = 0xFF  #: distinct-class id, at most 255 classes
_SLOT_SHIFT = 21
_SLOT_MASK = 0x3FF  #: slot index in 10 bits: at most 256 objects per zspage (class 48, chain 8)
_ZS_SHIFT = 31  #: class-local zspage number (or frame number for huge objects) above this


def location_to_obj(zs: int, slot: int, cid: int, size: int) -> int:
    """The live handle-table word of an object of `size` bytes in slot `slot` of class `cid`'s
    zspage `zs` (for a huge object: `zs` is its frame, slot 0). Kernel location_to_obj()."""
    return (
        zs << _ZS_SHIFT | slot << _SLOT_SHIFT | cid << _CID_SHIFT | (size - 1) << _SIZE_SHIFT | LIVE
    )


def obj_to_location(w: int) -> tuple[int, int, int, int]:
    """(class id, zspage or huge frame, slot, size) of the live word `w`: location_to_obj()'s
    inverse (kernel obj_to_location(), which also says the class through the zspage)."""
    return (
        w >> _CID_SHIFT & _CID_MASK,
        w >> _ZS_SHIFT,
        w >> _SLOT_SHIFT & _SLOT_MASK,
        (w >> _SIZE_SHIFT & _SIZE_MASK) + 1,
    )


def obj_size(w: int) -> int:
    """The object size a live handle-table word records."""
    return (w >> _SIZE_SHIFT & _SIZE_MASK) + 1


#: The distinct classes are numbered from the largest down, so the huge (4096 B) class is 0.
HUGE_CID = 0
#: Number of fullness groups: empty, ten 10% buckets, full (kernel NR_FULLNESS_GROUPS).
NR_GROUPS = 12
FULL_GROUP = NR_GROUPS - 1
#: group[L] of a class-local zspage number that is not in use.
UNUSED = 0xFF
#: frames[] entry of a zspage frame that has not been needed yet.
NOFRAME = 0xFFFFFFFF
#: Mask of groups 1..10 in a class's `mask`: the partly used zspages.
_PARTIAL = ((1 << FULL_GROUP) - 1) & ~1

#: How far compaction may pour an object up (see _pour): into a class at most this many percent
#: larger than the object itself, so a poured object never takes more than twice its bytes. The
#: slot was free and its frame held either way, so a pour never costs memory; the bound caps
#: what a poured object may waste later, once its class is full again. Measured on the
#: experiment's objects (150 MiB, 90 % deleted, in process): 25 % leaves 1.034 mem/compr after
#: compaction, 50 % 1.031, 100 % 1.026 (489 objects poured, 17 KB of slack: 0.3 % of the
#: bytes), 400 % 1.026; the fill alone packs at 1.018.
POUR_SLACK_PERCENT = 100

_PAGE_MASK = PAGE_SIZE - 1
# Offsets are turned into frame indices and back with a literal `>> 12` / `<< 12` in the hot
# paths below (a literal costs no global lookup): they hold for this page size only.
assert PAGE_SHIFT == 12


def fullness_group(inuse: int, objs: int) -> int:
    """Kernel get_fullness_group(): 0 empty, 11 full, else 100*inuse/objs in 10% buckets + 1."""
    if inuse == 0:
        return 0
    if inuse == objs:
        return FULL_GROUP
    return 100 * inuse // objs // 10 + 1


def class_table() -> tuple[list[SizeClass], bytes, int]:
    """The distinct classes numbered from the largest down (class id = list index, so the huge
    class is HUGE_CID), request size -> class id for sizes 0..4096, and the huge watermark:
    what both engines are built from."""
    distinct, table, watermark = build_classes()
    assert distinct[HUGE_CID].huge and distinct[HUGE_CID].size == PAGE_SIZE
    cid_of_index = {sc.index: cid for cid, sc in enumerate(distinct)}
    cid_of_size = bytes(
        cid_of_index[table[class_index(max(size, 1))].index] for size in range(PAGE_SIZE + 1)
    )
    assert all(cid_of_size[s] == HUGE_CID for s in range(watermark, PAGE_SIZE + 1))
    assert cid_of_size[watermark - 1] != HUGE_CID
    return distinct, cid_of_size, watermark


class _Class:
    """Bookkeeping of one distinct size class (see the module comment for the arrays)."""

    __slots__ = (
        "cid",
        "index",
        "size",
        "pages",
        "objs",
        "huge",
        "group_of",
        "chain_init",
        "frames",
        "slots",
        "inuse",
        "freeobj",
        "group",
        "prev",
        "next",
        "heads",
        "mask",
        "free_zs",
        "zspages",
        "obj_used",
        "frames_used",
        "no_frames",
        "structures_bytes",
    )

    def __init__(self, cid: int, sc: SizeClass) -> None:
        self.cid = cid
        self.index = sc.index
        self.size = sc.size
        self.pages = sc.pages_per_zspage
        self.objs = n = sc.objs_per_zspage
        self.huge = sc.huge
        #: inuse -> fullness group, so regrouping is one lookup.
        self.group_of = bytes(fullness_group(i, n) for i in range(n + 1))
        #: Slot words of a fresh zspage: every slot free, chained in slot order.
        self.chain_init = array("I", [(s + 2) << 1 for s in range(n - 1)] + [0])
        #: Frame entries of a fresh zspage: none made yet.
        self.no_frames = array("I", [NOFRAME] * self.pages)
        self.zspages = 0
        self.obj_used = 0
        self.frames_used = 0
        #: sys.getsizeof summed over structures(), or -1 once a per-zspage array changed length
        #: (a zspage made or freed): metadata_bytes() recomputes only such classes.
        self.structures_bytes = -1
        self.empty_out()

    def empty_out(self) -> None:
        """Forget every zspage (there must be none left). The per-zspage arrays keep their
        peak length while any zspage lives, since zspage numbers are in the handle words;
        once the class is empty they start afresh, so that the 20-odd bytes per zspage it
        ever had go back to the OS too."""
        self.frames = array("I")
        self.slots = array("I")
        self.inuse = array("H")
        self.freeobj = array("h")
        self.group = array("B")
        self.prev = array("i")
        self.next = array("i")
        self.heads = [-1] * NR_GROUPS
        self.mask = 0
        self.free_zs = array("i")
        self.structures_bytes = -1

    def can_compact(self) -> int:
        """Kernel zs_can_compact(): frames that whole zspages' worth of free slots would free."""
        n = self.objs
        return (self.zspages * n - self.obj_used) // n * self.pages

    def fix_fullness_group(self, z: int) -> None:
        """Kernel fix_fullness_group(): move zspage z to the list its inuse now belongs on."""
        g = self.group_of[self.inuse[z]]
        if g != self.group[z]:
            self.unlink(z)
            self.link(z, g)

    def unlink(self, z: int) -> None:
        p = self.prev[z]
        x = self.next[z]
        if p >= 0:
            self.next[p] = x
        else:
            g = self.group[z]
            self.heads[g] = x
            if x < 0:
                self.mask &= ~(1 << g)
        if x >= 0:
            self.prev[x] = p

    def link(self, z: int, g: int) -> None:
        """Put zspage z at the head of group g's list (LIFO, like list_add)."""
        x = self.heads[g]
        self.prev[z] = -1
        self.next[z] = x
        if x >= 0:
            self.prev[x] = z
        else:
            self.mask |= 1 << g
        self.heads[g] = z
        self.group[z] = g

    def structures(self) -> list[object]:
        return [
            self,
            self.group_of,
            self.chain_init,
            self.no_frames,
            self.frames,
            self.slots,
            self.inuse,
            self.freeobj,
            self.group,
            self.prev,
            self.next,
            self.heads,
            self.free_zs,
        ]


class ZsmallocPool(Pool):
    """The zsmalloc allocator (see the module comment)."""

    kind = "zsmalloc"

    def __init__(self, mem_limit_pages: int = 0) -> None:
        super().__init__(mem_limit_pages)
        distinct, cid_of_size, watermark = class_table()
        self._classes = [_Class(cid, sc) for cid, sc in enumerate(distinct)]
        #: Request size -> distinct class id, for sizes 0..4096 (0 is rejected before lookup).
        self._cid_of_size = cid_of_size
        self._huge_size = watermark
        #: Non-huge classes from the largest down: __zs_compact's visiting order.
        self._compact_order = [c for c in self._classes if not c.huge]
        self._compact_cursor = 0  #: where the last compact_step() stopped in _compact_order
        #: Frames migration made for destination zspages (frames are made lazily) and not yet
        #: set against frames it freed: pages_compacted counts what compaction gave back net.
        self._compaction_debt = 0
        #: Live zspages of the non-huge classes (a huge object is its own zspage): a counter,
        #: so that statistics() need not sum the classes.
        self._zspages = 0
        #: Whether a compaction pass has poured and trimmed every class since the last free or
        #: new zspage: until then can_compact() counts the residue too, and compact_step()
        #: pours. (Frees and new zspages are what leave partly used zspages behind.)
        self._settled = True

    @property
    def huge_class_size(self) -> int:
        return self._huge_size

    # -- zspage alloc/free --------------------------------------------------------------------

    def _new_zspage(self, c: _Class) -> int:
        """Create an empty zspage (no frames yet) in class c, linked into group 0."""
        p = c.pages
        n = c.objs
        if c.free_zs:
            z = c.free_zs.pop()
            c.frames[z * p : z * p + p] = c.no_frames
            c.slots[z * n : z * n + n] = c.chain_init
            c.inuse[z] = 0
            c.freeobj[z] = 0
        else:
            z = len(c.inuse)
            c.frames.extend(c.no_frames)
            c.slots.extend(c.chain_init)
            c.inuse.append(0)
            c.freeobj.append(0)
            c.group.append(UNUSED)
            c.prev.append(-1)
            c.next.append(-1)
        c.link(z, 0)
        c.zspages += 1
        self._zspages += 1
        c.structures_bytes = -1
        self._settled = False  # a fresh zspage is a sparse one, until it fills
        return z

    def _missing_frames(self, c: _Class, z: int, s: int) -> int:
        """How many frames slot s of zspage z still needs before it can be used."""
        off = s * c.size
        fi = z * c.pages + (off >> 12)
        frames = c.frames
        need = int(frames[fi] == NOFRAME)
        if (off + c.size - 1) >> 12 != off >> 12 and frames[fi + 1] == NOFRAME:
            need += 1
        return need

    def _make_frames(self, c: _Class, z: int, s: int) -> int:
        """Give slot s of zspage z the frames it spans (PoolFullError only if the OS refuses);
        returns how many it made."""
        made = 0
        off = s * c.size
        fi = z * c.pages + (off >> 12)
        last = z * c.pages + ((off + c.size - 1) >> 12)
        frames = c.frames
        while fi <= last:
            if frames[fi] == NOFRAME:
                frames[fi] = self.arena.alloc()
                made += 1
                c.frames_used += 1
                self.pages_used += 1
                if self.pages_used > self.max_pages_used:
                    self.max_pages_used = self.pages_used
            fi += 1
        return made

    def _free_zspage(self, c: _Class, z: int) -> int:
        """Unlink an empty zspage and give its frames back to the OS at once; return how many."""
        c.unlink(z)
        c.group[z] = UNUSED
        p = c.pages
        free = self.arena.free
        freed = 0
        for f in c.frames[z * p : z * p + p]:
            if f != NOFRAME:
                free(f)
                freed += 1
        c.free_zs.append(z)
        c.structures_bytes = -1
        c.zspages -= 1
        self._zspages -= 1
        c.frames_used -= freed
        self.pages_used -= freed
        if c.zspages == 0:
            c.empty_out()
        return freed

    # -- object alloc/free --------------------------------------------------------------------

    def _alloc(self, size: int) -> int:
        """Allocate an object of `size` bytes and issue its handle (the kernel's zs_malloc)."""
        if not 0 < size <= PAGE_SIZE:
            raise InvalidSizeError(f"object size {size} outside 1..{PAGE_SIZE}")
        self._check_handle_room()
        cid = self._cid_of_size[size]
        if cid == HUGE_CID:
            if self.mem_limit_pages and self.pages_used >= self.mem_limit_pages:
                raise PoolFullError(f"mem_limit of {self.mem_limit_pages} pages reached")
            frame = self.arena.alloc()
            self.pages_used += 1
            if self.pages_used > self.max_pages_used:
                self.max_pages_used = self.pages_used
            self.huge_objects += 1
            c = self._classes[HUGE_CID]
            c.obj_used += 1
            c.zspages += 1
            h = self._take_handle(location_to_obj(frame, 0, HUGE_CID, size))
        else:
            c = self._classes[cid]
            # find_get_zspage(): the fullest non-full zspage, scanning groups 10 down to 0.
            m = c.mask & (_PARTIAL | 1)
            if m:
                z = c.heads[m.bit_length() - 1]
                s = c.freeobj[z]
                need = self._missing_frames(c, z, s)
            else:
                z = -1
                s = 0
                need = 1  # slot 0 of a fresh zspage: classes are < PAGE_SIZE, so one frame
            if need:
                if self.mem_limit_pages and self.pages_used + need > self.mem_limit_pages:
                    raise PoolFullError(
                        f"mem_limit of {self.mem_limit_pages} pages reached, {self.pages_used} used"
                    )
                if z < 0:
                    z = self._new_zspage(c)
                try:
                    self._make_frames(c, z, s)
                except PoolFullError:
                    if c.inuse[z] == 0:
                        self._free_zspage(c, z)  # no half-made zspage stays behind
                    raise
            base = z * c.objs
            slots = c.slots
            c.freeobj[z] = (slots[base + s] >> 1) - 1
            h = self._take_handle(location_to_obj(z, s, cid, size))
            slots[base + s] = h << 1 | LIVE
            c.inuse[z] += 1
            c.fix_fullness_group(z)
            c.obj_used += 1
        self.bytes_stored += size
        return h

    def malloc(self, size: int) -> int:
        return self._alloc(size)

    def store(self, data: BytesLike) -> int:
        h = self._alloc(len(data))
        self._put(self.hloc[h], data, len(data))
        return h

    def free(self, h: int) -> int:
        cid, z, s, size = obj_to_location(self._word(h))
        c = self._classes[cid]
        if cid == HUGE_CID:
            self.arena.free(z)
            self.pages_used -= 1
            self.huge_objects -= 1
            c.obj_used -= 1
            c.zspages -= 1
        else:
            i = z * c.objs + s
            # The slot must name this handle back (the kernel's in-object header does): a
            # mismatch means the tables disagree, and freeing would corrupt a live object.
            if not (0 <= i < len(c.slots) and c.slots[i] == h << 1 | LIVE):
                raise PoolCorruptionError(f"handle {h}: slot ({z},{s}) of class {c.size} is not it")
            c.slots[i] = (c.freeobj[z] + 1) << 1
            c.freeobj[z] = s
            inuse = c.inuse[z] - 1
            c.inuse[z] = inuse
            c.obj_used -= 1
            if inuse == 0:
                self._free_zspage(c, z)
            else:
                c.fix_fullness_group(z)
        self._release_handle(h)
        self.bytes_stored -= size
        self._settled = False
        return size

    # -- object access ------------------------------------------------------------------------

    def _put(self, w: int, data: BytesLike, n: int) -> None:
        """Copy n bytes of data to the start of the object that handle word w locates."""
        cid, z, s, _size = obj_to_location(w)
        if cid == HUGE_CID:
            frame = z
            inoff = 0
        else:
            c = self._classes[cid]
            off = s * c.size
            fi = z * c.pages + (off >> 12)
            frame = c.frames[fi]
            inoff = off & _PAGE_MASK
            if inoff + n > PAGE_SIZE:  # straddles into the zspage's next frame
                head = PAGE_SIZE - inoff
                mv = memoryview(data)
                nxt = c.frames[fi + 1]
                seg = self.arena.segments[frame >> SEGMENT_SHIFT]
                pos = ((frame & SEGMENT_MASK) << 12) + inoff
                seg[pos : pos + head] = mv[:head]
                seg = self.arena.segments[nxt >> SEGMENT_SHIFT]
                pos = (nxt & SEGMENT_MASK) << 12
                seg[pos : pos + n - head] = mv[head:]
                return
        seg = self.arena.segments[frame >> SEGMENT_SHIFT]
        pos = ((frame & SEGMENT_MASK) << 12) + inoff
        seg[pos : pos + n] = data

    def _get(self, w: int) -> bytes:
        """The bytes of the object that handle word w locates."""
        return self._get_many((w,))[0]

    def _get_many(self, words: Iterable[int]) -> list[bytes]:
        """The bytes of the objects the handle words locate, in order. One loop for a whole
        FUSE read (32 objects for 128 KiB): per-object calls and attribute lookups would cost
        a third as much again as the copying itself."""
        classes = self._classes
        segments = self.arena.segments
        out: list[bytes] = []
        append = out.append
        for w in words:
            cid, z, s, n = obj_to_location(w)
            if cid == HUGE_CID:
                pos = (z & SEGMENT_MASK) << 12
                append(segments[z >> SEGMENT_SHIFT][pos : pos + n])
                continue
            c = classes[cid]
            off = s * c.size
            fi = z * c.pages + (off >> 12)
            frame = c.frames[fi]
            inoff = off & _PAGE_MASK
            pos = ((frame & SEGMENT_MASK) << 12) + inoff
            if inoff + n <= PAGE_SIZE:
                append(segments[frame >> SEGMENT_SHIFT][pos : pos + n])
                continue
            # Straddles into the zspage's next frame, which need not be adjacent.
            head = PAGE_SIZE - inoff
            nxt = c.frames[fi + 1]
            pos2 = (nxt & SEGMENT_MASK) << 12
            append(
                segments[frame >> SEGMENT_SHIFT][pos : pos + head]
                + segments[nxt >> SEGMENT_SHIFT][pos2 : pos2 + n - head]
            )
        return out

    def read(self, h: int) -> bytes:
        try:
            w = self.hloc[h] if h > 0 else 0
        except (IndexError, TypeError):
            w = 0
        if not w & LIVE:
            self._word(h)  # raises the right InvalidHandleError
        return self._get(w)

    def read_many(self, handles: list[int]) -> list[bytes]:
        hloc = self.hloc
        limit = len(hloc)
        words = [hloc[h] if 0 < h < limit else 0 for h in handles]
        for h, w in zip(handles, words, strict=True):
            if not w & LIVE:
                self._word(h)  # raises the right InvalidHandleError
        return self._get_many(words)

    def write(self, h: int, data: BytesLike) -> None:
        w = self._word(h)
        n = len(data)
        size = obj_size(w)
        if n > size:
            raise InvalidSizeError(f"write of {n} bytes into a {size}-byte object")
        self._put(w, data, n)

    def object_size(self, h: int) -> int:
        return obj_size(self._word(h))

    # -- compaction ---------------------------------------------------------------------------

    def can_compact(self, pour: bool = True) -> int:
        """Frames compaction could free now: per class, the kernel's zs_can_compact() (whole
        zspages' worth of free slots, times pages_per_zspage), or, until a pass has settled
        the pool, the bytes of frames the class holds beyond a dense packing of its objects if
        that is more (what pouring and trimming might give back: an estimate, which the
        compactor's threshold reads). With lazily made frames both are upper bounds. After a
        compact_step() that returned 0 it is 0: that step settled the pool. `pour=False`:
        the kernel's count only, what compact_step(pour=False) works towards."""
        settled = self._settled or not pour
        total = 0
        for c in self._compact_order:
            n = c.objs
            kernel = (c.zspages * n - c.obj_used) // n * c.pages << 12
            if not settled:
                # frames_used - obj_used * pages / objs frames, in bytes (rounded down)
                residue = ((c.frames_used * n - c.obj_used * c.pages) << 12) // n
                if residue > kernel:
                    kernel = residue
            total += kernel
        return total >> 12

    def compact_step(self, max_objects: int = 64, pour: bool = True) -> int:
        """One bounded slice of compaction: classes from the largest down, each first drained
        as zs_compact() does (while zs_can_compact() says a whole zspage could be freed), then
        its sparse remainder poured into larger classes (_pour), unless the pool is settled.

        A cursor remembers the class the last slice stopped in, so that many small slices cost
        no more than one big one (the background compactor takes slices of a few objects). A
        slice that goes round every class and moves nothing settles the pool: the residue is
        left alone until the next free or new zspage. With `pour=False` only the kernel's
        pass runs, and nothing is settled."""
        from .zsmalloc_pour import pack_zspages
        from .zsmalloc_pour import pour as pour_class

        if max_objects <= 0:
            return 0
        moved = 0
        order = self._compact_order
        start = i = self._compact_cursor
        while True:
            c = order[i]
            n = c.objs
            while moved < max_objects and (c.zspages * n - c.obj_used) >= n:
                part = c.mask & _PARTIAL
                # src: the emptiest non-empty zspage; dst: the fullest non-full one. Free slots
                # worth a whole zspage imply two partly used zspages, so they differ.
                src = c.heads[(part & -part).bit_length() - 1]
                dst = c.heads[part.bit_length() - 1]
                if dst == src:
                    dst = c.next[src]
                if dst < 0:  # cannot happen while the invariants hold
                    raise PoolCorruptionError(f"class {c.size}: can_compact>0, one partial zspage")
                moved += self._migrate(c, src, dst, max_objects - moved)
            if pour and moved < max_objects and not self._settled and c.zspages:
                moved += pour_class(self, c, max_objects - moved)
            if moved >= max_objects:
                break
            i = i + 1 if i + 1 < len(order) else 0
            if i == start:
                break
        self._compact_cursor = i
        self.objects_moved += moved
        if moved == 0 and pour and not self._settled:
            self._settled = True
            # Settled: the tables' free tails can go (pack_zspages, pack_handle_table), and
            # the free frames are sorted to be reused lowest first (FrameArena.pack).
            for c in order:
                pack_zspages(self, c)
            self.pack_handle_table()
            self.arena.pack()
        return moved

    # Pouring and packing (what userspace adds to compaction) live in zsmalloc_pour.py.

    def _credit(self, freed: int) -> None:
        """Count frames compaction freed in pages_compacted, net of those it made."""
        net = freed - self._compaction_debt
        self.pages_compacted += max(net, 0)
        self._compaction_debt = max(-net, 0)

    def _migrate(self, c: _Class, src: int, dst: int, budget: int) -> int:
        """Kernel migrate_zspage(): move objects from src to dst in slot order until dst is full,
        src is empty, or the budget is spent; then regroup both (and free src if emptied)."""
        n = c.objs
        slots, inuse, freeobj, hloc = c.slots, c.inuse, c.freeobj, self.hloc
        sbase, dbase = src * n, dst * n
        s = 0
        moved = 0
        nbytes = 0
        while moved < budget and inuse[src] and inuse[dst] < n:
            while not slots[sbase + s] & LIVE:
                s += 1
            sw = slots[sbase + s]
            h = sw >> 1
            w = hloc[h]
            data = self._get(w)
            d = freeobj[dst]
            # Compaction may need a frame of dst before src gives its frames back; it is allowed
            # past mem_limit_pages for that, since every completed pass holds fewer frames.
            self._compaction_debt += self._make_frames(c, dst, d)
            freeobj[dst] = (slots[dbase + d] >> 1) - 1
            slots[dbase + d] = sw
            inuse[dst] += 1
            nw = location_to_obj(dst, d, c.cid, obj_size(w))
            self._put(nw, data, len(data))
            hloc[h] = nw  # the handle now names the new location: the move is complete
            slots[sbase + s] = (freeobj[src] + 1) << 1
            freeobj[src] = s
            inuse[src] -= 1
            moved += 1
            nbytes += len(data)
            s += 1
        self.bytes_moved += nbytes
        c.fix_fullness_group(dst)
        if inuse[src] == 0:
            self._credit(self._free_zspage(c, src))
        else:
            c.fix_fullness_group(src)
        return moved

    # -- statistics ---------------------------------------------------------------------------

    def class_statistics(self) -> list[ClassStats]:
        rows = []
        for c in self._classes:
            hist = [0] * NR_GROUPS
            if c.huge:
                hist[FULL_GROUP] = c.zspages
            else:
                for g in range(NR_GROUPS):
                    z = c.heads[g]
                    while z >= 0:
                        hist[g] += 1
                        z = c.next[z]
            rows.append(
                ClassStats(
                    index=c.index,
                    size=c.size,
                    inuse_histogram=tuple(hist[1:]),
                    obj_allocated=c.zspages * c.objs,
                    obj_used=c.obj_used,
                    pages_used=c.zspages if c.huge else c.frames_used,
                    pages_per_zspage=c.pages,
                    objs_per_zspage=c.objs,
                    freeable=0 if c.huge else c.can_compact(),
                )
            )
        rows.sort(key=lambda r: r.index)
        return rows

    def _zspage_count(self) -> int:
        return self._zspages + self.huge_objects

    def _structures(self) -> list[object]:
        out: list[object] = [self._classes, self._cid_of_size, self._compact_order]
        for c in self._classes:
            out.extend(c.structures())
        return out

    def _structures_bytes(self) -> int:
        """_structures()'s sizes, with each class's part cached until one of its arrays changes
        length: a walk of 119 classes' 13 structures each took 200 us, too much for stats."""
        total = (
            sys.getsizeof(self._classes)
            + sys.getsizeof(self._cid_of_size)
            + sys.getsizeof(self._compact_order)
        )
        for c in self._classes:
            size = c.structures_bytes
            if size < 0:
                size = c.structures_bytes = sum(sys.getsizeof(s) for s in c.structures())
            total += size
        return total

    # -- the invariant checker ----------------------------------------------------------------

    def check(self) -> None:
        """Verify every zspage, list, slot and handle; raise PoolCorruptionError if any is off."""
        from .zsmalloc_check import check_zsmalloc

        check_zsmalloc(self)
