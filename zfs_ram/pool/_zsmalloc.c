/*
 * The compiled zsmalloc engine: zfs_ram/pool/zsmalloc.py's algorithm, in C.
 *
 * The pure-Python ZsmallocPool is the reference and this file follows it step for step, so
 * that the same calls give the same handles, the same frame numbers and the same statistics
 * (tests/pool/test_pool_engines.py drives both and compares after every step). Read the
 * module comment of zsmalloc.py for the design; in short:
 *   - the class table comes from Python (classes.py computes it as the kernel does);
 *   - each distinct class keeps parallel per-zspage arrays (frames, slots, inuse, freeobj,
 *     group, prev, next) indexed by a class-local zspage number, reused LIFO through free_zs;
 *   - the handle table hloc[] holds the object's location word
 *       zspage << 31 | slot << 21 | class id << 13 | (size - 1) << 1 | LIVE
 *     (a huge object: its frame instead of zspage and slot); free entries chain the free
 *     handles (LIFO), entry 0 is never used;
 *   - frames are 4 KiB pages of 64 MiB anonymous private mmap segments owned here; a freed
 *     frame is kept resident on a 64-frame warm stack or madvise(MADV_DONTNEED)-ed onto the
 *     free stack (frames.py's FrameArena, same order, same numbers), so the arena's Rss is
 *     (frames in use + warm) * 4096.
 *
 * Errors: the core functions below never touch Python; they return -1 and fill a zerr, which
 * the method wrappers turn into the pool's exceptions. A refused allocation changes nothing:
 * every array is grown before the first change.
 *
 * Concurrency: the batch calls and compaction release the GIL for their loops. The pool is
 * not thread-safe (one caller at a time, as in Python); `busy` is set while the GIL is
 * released and every method refuses to run on a busy pool, so a second thread gets a
 * RuntimeError instead of a data race.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE_SHIFT 12
#define PAGE_SIZE (1u << PAGE_SHIFT)
/* frames.py: 2**14 frames (64 MiB) per segment, 64 warm frames. */
#define SEGMENT_SHIFT 14
#define SEGMENT_FRAMES (1u << SEGMENT_SHIFT)
#define SEGMENT_MASK (SEGMENT_FRAMES - 1)
#define SEGMENT_BYTES ((size_t)SEGMENT_FRAMES << PAGE_SHIFT)
#define WARM_FRAMES 64

/* Handle-table word fields (zsmalloc.py). */
#define LIVE 1u
#define SIZE_SHIFT 1
#define SIZE_MASK 0xFFFu
#define CID_SHIFT 13
#define CID_MASK 0xFFu
#define SLOT_SHIFT 21
#define SLOT_MASK 0x3FFu
#define ZS_SHIFT 31
#define MAX_HANDLE ((1ull << 31) - 1)
/* A free word (bit 0 clear): the next free run's first handle << 1, and how many free
 * handles follow it in its run << RUN_SHIFT (base.py); those words are 0. */
#define RUN_SHIFT 33
#define NEXT_MASK 0xFFFFFFFFull

#define HUGE_CID 0
#define MAX_CLASSES 256
#define NR_GROUPS 12
#define FULL_GROUP (NR_GROUPS - 1)
#define PARTIAL_MASK ((((uint32_t)1 << FULL_GROUP) - 1) & ~(uint32_t)1)
#define UNUSED 0xFF
#define NOFRAME 0xFFFFFFFFu
/* compact() takes slices of this many objects, as Pool.compact() does. */
#define COMPACT_SLICE (1 << 16)
/* zsmalloc.py's POUR_SLACK_PERCENT: a poured object's class is at most this much larger. */
#define POUR_SLACK_PERCENT 100
/* base.py's TABLE_SLACK_DIVISOR and TABLE_MIN_FREE_HANDLES: when the tables are packed. */
#define TABLE_SLACK_DIVISOR 4
#define TABLE_MIN_FREE_HANDLES 64

/* -- errors ---------------------------------------------------------------------------- */

enum zerr_code {
    ZE_NONE = 0,
    ZE_SIZE,      /* InvalidSizeError */
    ZE_HANDLE,    /* InvalidHandleError */
    ZE_FULL,      /* PoolFullError: mem_limit */
    ZE_HANDLES,   /* PoolFullError: out of handles */
    ZE_NOMEM,     /* PoolFullError: the OS refused memory (mmap, malloc) */
    ZE_CORRUPT,   /* PoolCorruptionError */
};

typedef struct {
    int code;
    uint64_t a, b;      /* numbers for the message */
    const char *what;   /* a constant text for the message */
} zerr;

static PyObject *PoolFullError, *InvalidSizeError, *InvalidHandleError, *PoolCorruptionError;
static PyObject *ArrayType;

static int
fail(zerr *err, int code, uint64_t a, uint64_t b, const char *what)
{
    err->code = code;
    err->a = a;
    err->b = b;
    err->what = what;
    return -1;
}

/* Turn a zerr into the pool's exception; returns NULL for `return raise_zerr(...)`. */
static PyObject *
raise_zerr(const zerr *err)
{
    switch (err->code) {
    case ZE_SIZE:
        PyErr_Format(InvalidSizeError, "%s %llu outside 1..%u", err->what,
                     (unsigned long long)err->a, PAGE_SIZE);
        break;
    case ZE_HANDLE:
        PyErr_Format(InvalidHandleError, "handle %llu %s", (unsigned long long)err->a,
                     err->what);
        break;
    case ZE_FULL:
        PyErr_Format(PoolFullError, "mem_limit of %llu pages reached, %llu used",
                     (unsigned long long)err->a, (unsigned long long)err->b);
        break;
    case ZE_HANDLES:
        PyErr_SetString(PoolFullError, "out of handles");
        break;
    case ZE_NOMEM:
        PyErr_Format(PoolFullError, "the OS refused memory: %s", err->what);
        break;
    case ZE_CORRUPT:
        PyErr_Format(PoolCorruptionError, "%s (%llu, %llu)", err->what,
                     (unsigned long long)err->a, (unsigned long long)err->b);
        break;
    default:
        PyErr_SetString(PyExc_SystemError, "zsmalloc engine: error without a code");
    }
    return NULL;
}

/* Grow *p (of *cap elements of `size` bytes) to hold at least `need`: by a quarter, at least
 * `least`. 0 on success; on failure nothing changed. */
static int
grow(void **p, size_t *cap, size_t need, size_t size, size_t least)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap + *cap / 4;
    if (n < need)
        n = need;
    if (n < least)
        n = least;
    if (n > SIZE_MAX / size)
        return -1;
    void *q = realloc(*p, n * size);
    if (q == NULL)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

/* -- the frame arena (frames.py's FrameArena) ------------------------------------------- */

/* A free-stack entry with this bit counts a run (arena_pack): the entry below it is the run's
 * first frame, and the run's frames are popped lowest first. Frame numbers stay below it. */
#define RUN_TAG 0x80000000u

typedef struct {
    char **seg;
    size_t nseg, segcap;
    /* LIFO of DONTNEED-ed frames, nfree entries; capacity >= frames_created. An entry is a
     * frame, or RUN_TAG | n above a frame f: the n frames f..f+n-1 (arena_pack). */
    uint32_t *free_frames;
    size_t nfree, freecap;
    size_t free_count; /* frames on the free stack (entries count runs once) */
    uint32_t warm[WARM_FRAMES]; /* LIFO of freed frames still resident */
    size_t nwarm;
    /* While `defer` is set (a batch call, a compaction pass) released frames are pushed on
     * the free stack at once, in the reference's order, but their madvise waits: the top
     * `npending` entries of the free stack are those frames, and arena_flush() gives them
     * back sorted, one madvise per run of adjacent frames (a pass frees thousands). */
    int defer;
    size_t npending;
    uint64_t frames_created;
    uint64_t madvise_failures; /* check() reports them: Rss would exceed frames in use */
} arena_t;

static inline char *
frame_ptr(const arena_t *a, uint32_t f)
{
    return a->seg[f >> SEGMENT_SHIFT] + ((size_t)(f & SEGMENT_MASK) << PAGE_SHIFT);
}

static int
arena_grow(arena_t *a, zerr *err)
{
    if (a->nseg == a->segcap &&
        grow((void **)&a->seg, &a->segcap, a->nseg + 1, sizeof(char *), 4) < 0)
        return fail(err, ZE_NOMEM, 0, 0, "segment table");
    void *m = mmap(NULL, SEGMENT_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED)
        return fail(err, ZE_NOMEM, 0, 0, "cannot map another 64 MiB segment");
#ifdef MADV_NOHUGEPAGE
    /* A huge page would make one touched frame cost 2 MiB, and DONTNEED of 4 KiB in it
     * would free nothing (frames.py). Advice only: a kernel without THP refuses it. */
    (void)madvise(m, SEGMENT_BYTES, MADV_NOHUGEPAGE);
#endif
    a->seg[a->nseg++] = m;
    return 0;
}

/* A resident frame: warm first, then a freed one, then a fresh one. */
static int
arena_alloc(arena_t *a, uint32_t *out, zerr *err)
{
    uint32_t f;
    if (a->nwarm) {
        *out = a->warm[--a->nwarm]; /* resident already; its old bytes are not cleared */
        return 0;
    }
    if (a->nfree) {
        uint32_t top = a->free_frames[a->nfree - 1];
        a->free_count--;
        if (top & RUN_TAG) {
            /* A run's lowest frame; never pending (runs are made after a flush, and frames
             * released since sit above them). */
            uint32_t n = top & ~RUN_TAG;
            f = a->free_frames[a->nfree - 2];
            a->free_frames[a->nfree - 2] = f + 1;
            if (n > 2)
                a->free_frames[a->nfree - 1] = RUN_TAG | (n - 1);
            else
                a->nfree--;
            goto fault_in;
        }
        f = a->free_frames[--a->nfree];
        if (a->npending) {
            /* Released in this batch and still resident: reused as it is, like a warm frame
             * (giving it back only to fault it in again would cost two kernel entries). Only
             * its unused bytes differ from the reference's, which are zeros there. */
            a->npending--;
            *out = f;
            return 0;
        }
    } else {
        if (a->frames_created >= RUN_TAG)
            return fail(err, ZE_NOMEM, 0, 0, "frame numbers exhausted");
        f = (uint32_t)a->frames_created;
        if ((f >> SEGMENT_SHIFT) == a->nseg && arena_grow(a, err) < 0)
            return -1;
        /* Room on the free stack for every frame made, so that freeing never allocates. */
        if (grow((void **)&a->free_frames, &a->freecap, (size_t)f + 1, sizeof(uint32_t),
                 1024) < 0)
            return fail(err, ZE_NOMEM, 0, 0, "free-frame stack");
        a->frames_created = (uint64_t)f + 1;
    }
fault_in:
    *(volatile char *)frame_ptr(a, f) = 0; /* fault it in: Rss follows pages_used */
    *out = f;
    return 0;
}

static void
arena_release(arena_t *a, uint32_t f)
{
    a->free_frames[a->nfree++] = f;
    a->free_count++;
    if (a->defer)
        a->npending++;
    else if (madvise(frame_ptr(a, f), PAGE_SIZE, MADV_DONTNEED) != 0)
        a->madvise_failures++;
}

#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
/* The calling process, as a pidfd (PIDFD_SELF_THREAD_GROUP of linux/fcntl.h, Linux 6.14+):
 * unlike a pidfd_open() of our pid, it cannot name the parent after a fork. */
#define PIDFD_SELF_PROCESS (-10001)
#define MADVISE_BATCH 1024 /* UIO_MAXIOV: ranges per process_madvise() */

/* Cleared for good when the kernel refuses process_madvise(MADV_DONTNEED) on ourselves
 * (before Linux 6.14 or so: ENOSYS, EINVAL or EBADF); madvise() run by run then. */
static atomic_int batch_madvise_works = 1;

/* DONTNEED every range of `runs`. One process_madvise() gives back up to MADVISE_BATCH
 * ranges under one mmap lock and one TLB flush: measured here, 12,800 scattered single
 * frames in 10-12 ms against 27-28 ms for a madvise() each (the kernel's per-call cost is
 * most of giving back frames a compaction pass emptied). */
static void
dontneed_runs(arena_t *a, const struct iovec *runs, size_t n)
{
    if (atomic_load_explicit(&batch_madvise_works, memory_order_relaxed)) {
        size_t bytes = 0;
        for (size_t i = 0; i < n; i++)
            bytes += runs[i].iov_len;
        long done = syscall(SYS_process_madvise, PIDFD_SELF_PROCESS, runs, n, MADV_DONTNEED, 0);
        if (done >= 0 && (size_t)done == bytes)
            return;
        if (done < 0 && (errno == ENOSYS || errno == EINVAL || errno == EBADF || errno == EPERM))
            atomic_store_explicit(&batch_madvise_works, 0, memory_order_relaxed);
        /* Refused or stopped part way: redo every range (DONTNEED twice frees nothing twice). */
    }
    for (size_t i = 0; i < n; i++)
        if (madvise(runs[i].iov_base, runs[i].iov_len, MADV_DONTNEED) != 0)
            a->madvise_failures++;
}

/* Frames are distinct numbers below frames_created, so a bitmap of them sorts in one pass
 * over frames_created / 64 words (qsort's comparisons were a fifth of a compaction pass).
 * NULL without memory. */
static uint64_t *
frame_bitmap(const arena_t *a, size_t *nwords)
{
    *nwords = (size_t)((a->frames_created + 63) / 64);
    return calloc(*nwords ? *nwords : 1, sizeof(uint64_t));
}

static inline void
mark_frame(uint64_t *bits, uint32_t f)
{
    bits[f >> 6] |= 1ull << (f & 63);
}

/* Collects ranges for dontneed_runs(), MADVISE_BATCH per call. */
typedef struct {
    struct iovec runs[MADVISE_BATCH];
    size_t n;
} run_batch;

static void
batch_add(arena_t *a, run_batch *b, uint32_t first, uint32_t count)
{
    b->runs[b->n].iov_base = frame_ptr(a, first);
    b->runs[b->n].iov_len = (size_t)count * PAGE_SIZE;
    if (++b->n == MADVISE_BATCH) {
        dontneed_runs(a, b->runs, b->n);
        b->n = 0;
    }
}

/* Give the pending frames back to the OS: in frame order, one range per run of adjacent
 * frames in one segment (without memory for the bitmap, one by one). */
static void
arena_flush(arena_t *a)
{
    size_t n = a->npending, nwords;
    const uint32_t *top = a->free_frames + (a->nfree - n);
    uint64_t *bits = n > 1 ? frame_bitmap(a, &nwords) : NULL;
    run_batch b;
    b.n = 0;
    if (bits == NULL) {
        for (size_t i = 0; i < n; i++)
            batch_add(a, &b, top[i], 1);
    } else {
        for (size_t i = 0; i < n; i++)
            mark_frame(bits, top[i]);
        uint32_t first = 0, count = 0;
        for (size_t wi = 0; wi < nwords; wi++) {
            for (uint64_t word = bits[wi]; word; word &= word - 1) {
                uint32_t f = (uint32_t)(wi * 64 + (size_t)__builtin_ctzll(word));
                if (count && f == first + count && (f >> SEGMENT_SHIFT) == (first >> SEGMENT_SHIFT)) {
                    count++;
                    continue;
                }
                if (count)
                    batch_add(a, &b, first, count);
                first = f;
                count = 1;
            }
        }
        if (count)
            batch_add(a, &b, first, count);
        free(bits);
    }
    if (b.n)
        dontneed_runs(a, b.runs, b.n);
    a->npending = 0;
}

/* The free stack's frames, bottom to top as a flat stack would hold them (a run's highest
 * frame first, its lowest on top), into out[free_count]. */
static void
arena_free_list(const arena_t *a, uint32_t *out)
{
    size_t k = 0;
    for (size_t i = 0; i < a->nfree; i++) {
        uint32_t f = a->free_frames[i];
        if (i + 1 < a->nfree && (a->free_frames[i + 1] & RUN_TAG)) {
            uint32_t n = a->free_frames[++i] & ~RUN_TAG;
            for (uint32_t j = n; j-- > 0;)
                out[k++] = f + j;
        } else {
            out[k++] = f;
        }
    }
}

/* Sort the free stack so that the lowest frame is popped first (zsmalloc.py packs at the
 * same moment, frames.py's FrameArena.pack), and keep its runs of adjacent frames as two
 * entries each: after a mass delete the stack holds most frames ever made, 4 bytes each
 * (1 GiB written, 90 % deleted: 0.55 MiB), and the stack's pages past its top go back to
 * the OS. Only outside a batch's pending frames (flushed first); without memory for the
 * sort nothing changes. */
/* Entry m of the packed stack: the run's lowest frame, and a RUN_TAG entry with its length if
 * it has more than one frame. */
static inline void
push_run(arena_t *a, size_t *m, uint32_t low, uint32_t count)
{
    a->free_frames[(*m)++] = low;
    if (count > 1)
        a->free_frames[(*m)++] = RUN_TAG | count;
}

static void
arena_pack(arena_t *a)
{
    arena_flush(a);
    size_t nwords;
    uint64_t *bits = a->free_count > 1 ? frame_bitmap(a, &nwords) : NULL;
    if (bits == NULL)
        return;
    for (size_t i = 0; i < a->nfree; i++) {
        uint32_t f = a->free_frames[i];
        if (i + 1 < a->nfree && (a->free_frames[i + 1] & RUN_TAG)) {
            uint32_t n = a->free_frames[++i] & ~RUN_TAG;
            for (uint32_t j = 0; j < n; j++)
                mark_frame(bits, f + j);
        } else {
            mark_frame(bits, f);
        }
    }
    /* Highest frames at the bottom, so that the lowest is popped first. */
    size_t m = 0;
    uint32_t low = 0, count = 0;
    for (size_t wi = nwords; wi-- > 0;) {
        for (uint64_t word = bits[wi]; word;) {
            int bit = 63 - __builtin_clzll(word);
            word &= ~(1ull << bit);
            uint32_t f = (uint32_t)(wi * 64 + (size_t)bit);
            if (count && f + 1 == low) {
                low = f;
                count++;
                continue;
            }
            if (count)
                push_run(a, &m, low, count);
            low = f;
            count = 1;
        }
    }
    if (count)
        push_run(a, &m, low, count);
    free(bits);
    a->nfree = m;
    uintptr_t lo = (uintptr_t)(a->free_frames + m), hi = (uintptr_t)(a->free_frames + a->freecap);
    lo = (lo + PAGE_SIZE - 1) & ~(uintptr_t)(PAGE_SIZE - 1);
    hi &= ~(uintptr_t)(PAGE_SIZE - 1);
    if (hi > lo) /* advice only: refused, the stack's unused tail stays resident */
        (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

static void
arena_defer(arena_t *a)
{
    a->defer = 1;
}

static void
arena_undefer(arena_t *a)
{
    arena_flush(a);
    a->defer = 0;
}

static void
arena_free(arena_t *a, uint32_t f)
{
    if (a->nwarm < WARM_FRAMES)
        a->warm[a->nwarm++] = f;
    else
        arena_release(a, f);
}

static size_t
arena_trim(arena_t *a)
{
    size_t n = a->nwarm;
    while (a->nwarm)
        arena_release(a, a->warm[--a->nwarm]);
    return n;
}

static void
arena_close(arena_t *a)
{
    for (size_t i = 0; i < a->nseg; i++)
        munmap(a->seg[i], SEGMENT_BYTES);
    free(a->seg);
    free(a->free_frames);
    memset(a, 0, sizeof(*a));
}

/* -- size classes ----------------------------------------------------------------------- */

typedef struct {
    uint32_t cid, index, size, pages, objs;
    int huge;
    uint8_t *group_of; /* inuse -> fullness group, objs + 1 entries */
    /* per-zspage arrays, nz in use, zcap allocated (zsmalloc.py's _Class) */
    uint32_t *frames;  /* [z * pages + k] */
    uint32_t *slots;   /* [z * objs + s] */
    uint16_t *inuse;
    int16_t *freeobj;
    uint8_t *group;
    int32_t *prev, *next;
    int32_t *free_zs;  /* LIFO of free zspage numbers */
    size_t nz, zcap, nfree_zs;
    int32_t heads[NR_GROUPS];
    uint32_t mask; /* bit g set iff heads[g] != -1 */
    int64_t zspages, obj_used, frames_used;
} zclass;

static void
class_empty_out(zclass *c)
{
    free(c->frames);
    free(c->slots);
    free(c->inuse);
    free(c->freeobj);
    free(c->group);
    free(c->prev);
    free(c->next);
    free(c->free_zs);
    c->frames = c->slots = NULL;
    c->inuse = NULL;
    c->freeobj = NULL;
    c->group = NULL;
    c->prev = c->next = c->free_zs = NULL;
    c->nz = c->zcap = c->nfree_zs = 0;
    for (int g = 0; g < NR_GROUPS; g++)
        c->heads[g] = -1;
    c->mask = 0;
}

static size_t
class_zspage_bytes(const zclass *c)
{
    return (size_t)c->pages * 4 + (size_t)c->objs * 4 + 2 + 2 + 1 + 4 + 4 + 4;
}

/* Room for one more zspage number; on failure nothing the pool uses changed. */
static int
class_reserve(zclass *c)
{
    if (c->nz < c->zcap)
        return 0;
    size_t n = c->zcap + c->zcap / 4;
    if (n < c->nz + 1)
        n = c->nz + 1;
    if (n < 4)
        n = 4;
    if (n > (size_t)INT32_MAX)
        return -1;
#define RE(field, type, per)                                                               \
    do {                                                                                   \
        void *q = realloc(c->field, n * (per) * sizeof(type));                             \
        if (q == NULL)                                                                     \
            return -1;                                                                     \
        c->field = q;                                                                      \
    } while (0)
    RE(frames, uint32_t, c->pages);
    RE(slots, uint32_t, c->objs);
    RE(inuse, uint16_t, 1);
    RE(freeobj, int16_t, 1);
    RE(group, uint8_t, 1);
    RE(prev, int32_t, 1);
    RE(next, int32_t, 1);
    RE(free_zs, int32_t, 1);
#undef RE
    c->zcap = n;
    return 0;
}

static void
class_unlink(zclass *c, int32_t z)
{
    int32_t p = c->prev[z], x = c->next[z];
    if (p >= 0) {
        c->next[p] = x;
    } else {
        uint8_t g = c->group[z];
        c->heads[g] = x;
        if (x < 0)
            c->mask &= ~((uint32_t)1 << g);
    }
    if (x >= 0)
        c->prev[x] = p;
}

/* Put zspage z at the head of group g's list (LIFO, like list_add). */
static void
class_link(zclass *c, int32_t z, uint8_t g)
{
    int32_t x = c->heads[g];
    c->prev[z] = -1;
    c->next[z] = x;
    if (x >= 0)
        c->prev[x] = z;
    else
        c->mask |= (uint32_t)1 << g;
    c->heads[g] = z;
    c->group[z] = g;
}

/* Kernel fix_fullness_group(): move zspage z to the list its inuse now belongs on. */
static void
fix_fullness_group(zclass *c, int32_t z)
{
    uint8_t g = c->group_of[c->inuse[z]];
    if (g != c->group[z]) {
        class_unlink(c, z);
        class_link(c, z, g);
    }
}

static inline int64_t
class_can_compact(const zclass *c)
{
    int64_t n = c->objs;
    return (c->zspages * n - c->obj_used) / n * (int64_t)c->pages;
}

static inline int
top_bit(uint32_t m)
{
    return 31 - __builtin_clz(m);
}

/* -- the engine object ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int ready, closed, busy;
    uint32_t nclasses;
    zclass *classes;
    uint8_t cid_of_size[PAGE_SIZE + 1];
    uint32_t huge_size;
    uint32_t *compact_order;
    uint32_t ncompact, compact_cursor;
    uint64_t *hloc;
    size_t hlen, hcap;
    uint64_t hfree;
    arena_t arena;
    int64_t mem_limit_pages, pages_used, max_pages_used, objects, bytes_stored, huge_objects;
    int64_t pages_compacted, objects_moved, bytes_moved, compaction_debt, zspages;
    int settled; /* zsmalloc.py's _settled: no pour or trim left since the last free or new zspage */
} Engine;

static inline uint64_t
location_to_obj(uint64_t zs, uint32_t slot, uint32_t cid, uint32_t size)
{
    return zs << ZS_SHIFT | (uint64_t)slot << SLOT_SHIFT | (uint64_t)cid << CID_SHIFT |
           (uint64_t)(size - 1) << SIZE_SHIFT | LIVE;
}

static inline uint32_t
obj_size(uint64_t w)
{
    return (uint32_t)(w >> SIZE_SHIFT & SIZE_MASK) + 1;
}

static inline uint32_t
obj_class(uint64_t w)
{
    return (uint32_t)(w >> CID_SHIFT & CID_MASK);
}

static inline uint32_t
obj_slot(uint64_t w)
{
    return (uint32_t)(w >> SLOT_SHIFT & SLOT_MASK);
}

static inline void
note_pages(Engine *e)
{
    if (e->pages_used > e->max_pages_used)
        e->max_pages_used = e->pages_used;
}

/* -- handles (base.py) ------------------------------------------------------------------ */

/* Refuse before any change if no handle can be issued; make room for one. */
static int
handle_room(Engine *e, zerr *err)
{
    if (e->hfree)
        return 0;
    if (e->hlen > MAX_HANDLE)
        return fail(err, ZE_HANDLES, 0, 0, NULL);
    if (grow((void **)&e->hloc, &e->hcap, e->hlen + 1, sizeof(uint64_t), 16) < 0)
        return fail(err, ZE_NOMEM, 0, 0, "handle table");
    return 0;
}

static uint64_t
take_handle(Engine *e, uint64_t word)
{
    e->objects++;
    uint64_t h = e->hfree;
    if (h) {
        uint64_t w = e->hloc[h];
        if (w >> RUN_SHIFT) { /* the rest of h's run: h + 1 heads it now */
            e->hloc[h + 1] = w - ((uint64_t)1 << RUN_SHIFT);
            e->hfree = h + 1;
        } else {
            e->hfree = w >> 1 & NEXT_MASK;
        }
        e->hloc[h] = word;
    } else {
        h = e->hlen++;
        e->hloc[h] = word;
    }
    return h;
}

/* A pool that empties starts a fresh handle table, as base.py's does. */
static void
release_handle(Engine *e, uint64_t h)
{
    e->objects--;
    if (e->objects == 0) {
        uint64_t *q = realloc(e->hloc, 16 * sizeof(uint64_t));
        if (q != NULL) { /* shrinking rarely fails; if it does the old table still serves */
            e->hloc = q;
            e->hcap = 16;
        }
        e->hlen = 1;
        e->hloc[0] = 0;
        e->hfree = 0;
        return;
    }
    e->hloc[h] = e->hfree << 1;
    e->hfree = h;
}

/* The live word of handle h, or 0. */
static inline uint64_t
live_word(const Engine *e, uint64_t h)
{
    if (h == 0 || h >= e->hlen)
        return 0;
    uint64_t w = e->hloc[h];
    return (w & LIVE) ? w : 0;
}

static int
word_of(const Engine *e, uint64_t h, uint64_t *w, zerr *err)
{
    if (h == 0 || h >= e->hlen)
        return fail(err, ZE_HANDLE, h, 0, "is unknown");
    *w = e->hloc[h];
    if (!(*w & LIVE))
        return fail(err, ZE_HANDLE, h, 0, "is not allocated");
    return 0;
}

/* -- zspage alloc/free ------------------------------------------------------------------ */

/* An empty zspage (no frames yet) in class c, linked into group 0. */
static int
new_zspage(Engine *e, zclass *c, int32_t *out, zerr *err)
{
    int32_t z;
    if (c->nfree_zs) {
        z = c->free_zs[--c->nfree_zs];
    } else {
        if (class_reserve(c) < 0)
            return fail(err, ZE_NOMEM, 0, 0, "zspage arrays");
        z = (int32_t)c->nz++;
        c->group[z] = UNUSED;
        c->prev[z] = c->next[z] = -1;
    }
    size_t p = c->pages, n = c->objs;
    for (size_t k = 0; k < p; k++)
        c->frames[(size_t)z * p + k] = NOFRAME;
    uint32_t *slots = c->slots + (size_t)z * n;
    for (size_t s = 0; s + 1 < n; s++)
        slots[s] = (uint32_t)(s + 2) << 1; /* every slot free, chained in slot order */
    slots[n - 1] = 0;
    c->inuse[z] = 0;
    c->freeobj[z] = 0;
    class_link(c, z, 0);
    c->zspages++;
    e->zspages++;
    e->settled = 0; /* a fresh zspage is a sparse one, until it fills */
    *out = z;
    return 0;
}

/* How many frames slot s of zspage z still needs before it can be used. */
static int
missing_frames(const zclass *c, int32_t z, uint32_t s)
{
    size_t off = (size_t)s * c->size;
    size_t fi = (size_t)z * c->pages + (off >> PAGE_SHIFT);
    int need = c->frames[fi] == NOFRAME;
    if (((off + c->size - 1) >> PAGE_SHIFT) != (off >> PAGE_SHIFT) && c->frames[fi + 1] == NOFRAME)
        need++;
    return need;
}

/* Give slot s of zspage z the frames it spans; *made says how many were made (also when the
 * OS refuses one: those made before it stay, counted). */
static int
make_frames(Engine *e, zclass *c, int32_t z, uint32_t s, int *made, zerr *err)
{
    size_t off = (size_t)s * c->size;
    size_t fi = (size_t)z * c->pages + (off >> PAGE_SHIFT);
    size_t last = (size_t)z * c->pages + ((off + c->size - 1) >> PAGE_SHIFT);
    *made = 0;
    for (; fi <= last; fi++) {
        if (c->frames[fi] == NOFRAME) {
            uint32_t f;
            if (arena_alloc(&e->arena, &f, err) < 0)
                return -1;
            c->frames[fi] = f;
            (*made)++;
            c->frames_used++;
            e->pages_used++;
            note_pages(e);
        }
    }
    return 0;
}

/* Unlink an empty zspage and give its frames back; returns how many. */
static int64_t
free_zspage(Engine *e, zclass *c, int32_t z)
{
    class_unlink(c, z);
    c->group[z] = UNUSED;
    int64_t freed = 0;
    for (size_t k = 0; k < c->pages; k++) {
        uint32_t f = c->frames[(size_t)z * c->pages + k];
        if (f != NOFRAME) {
            arena_free(&e->arena, f);
            freed++;
        }
    }
    c->free_zs[c->nfree_zs++] = z;
    c->zspages--;
    e->zspages--;
    c->frames_used -= freed;
    e->pages_used -= freed;
    if (c->zspages == 0)
        class_empty_out(c);
    return freed;
}

/* -- object alloc/free (the kernel's zs_malloc / zs_free) ------------------------------- */

static int
zs_alloc(Engine *e, uint64_t size, uint64_t *out_h, zerr *err)
{
    if (size == 0 || size > PAGE_SIZE)
        return fail(err, ZE_SIZE, size, 0, "object size");
    if (handle_room(e, err) < 0)
        return -1;
    uint32_t cid = e->cid_of_size[size];
    zclass *c = &e->classes[cid];
    uint64_t h;
    if (cid == HUGE_CID) {
        if (e->mem_limit_pages && e->pages_used >= e->mem_limit_pages)
            return fail(err, ZE_FULL, (uint64_t)e->mem_limit_pages, (uint64_t)e->pages_used,
                        NULL);
        uint32_t frame;
        if (arena_alloc(&e->arena, &frame, err) < 0)
            return -1;
        e->pages_used++;
        note_pages(e);
        e->huge_objects++;
        c->obj_used++;
        c->zspages++;
        h = take_handle(e, location_to_obj(frame, 0, HUGE_CID, (uint32_t)size));
    } else {
        /* find_get_zspage(): the fullest non-full zspage, scanning groups 10 down to 0. */
        uint32_t m = c->mask & (PARTIAL_MASK | 1);
        int32_t z;
        uint32_t s;
        int need;
        if (m) {
            z = c->heads[top_bit(m)];
            s = (uint32_t)c->freeobj[z];
            need = missing_frames(c, z, s);
        } else {
            z = -1;
            s = 0;
            need = 1; /* slot 0 of a fresh zspage: classes are < PAGE_SIZE, so one frame */
        }
        if (need) {
            if (e->mem_limit_pages && e->pages_used + need > e->mem_limit_pages)
                return fail(err, ZE_FULL, (uint64_t)e->mem_limit_pages,
                            (uint64_t)e->pages_used, NULL);
            if (z < 0 && new_zspage(e, c, &z, err) < 0)
                return -1;
            int made;
            if (make_frames(e, c, z, s, &made, err) < 0) {
                if (c->inuse[z] == 0)
                    free_zspage(e, c, z); /* no half-made zspage stays behind */
                return -1;
            }
        }
        size_t i = (size_t)z * c->objs + s;
        c->freeobj[z] = (int16_t)((c->slots[i] >> 1) - 1);
        h = take_handle(e, location_to_obj((uint64_t)z, s, cid, (uint32_t)size));
        c->slots[i] = (uint32_t)(h << 1 | LIVE);
        c->inuse[z]++;
        fix_fullness_group(c, z);
        c->obj_used++;
    }
    e->bytes_stored += (int64_t)size;
    *out_h = h;
    return 0;
}

/* Everything free() checks, in O(1), before it changes anything. */
static int
free_check(const Engine *e, uint64_t h, zerr *err)
{
    uint64_t w;
    if (word_of(e, h, &w, err) < 0)
        return -1;
    uint32_t cid = obj_class(w);
    if (cid >= e->nclasses)
        return fail(err, ZE_CORRUPT, h, cid, "handle names no class");
    const zclass *c = &e->classes[cid];
    if (cid == HUGE_CID) {
        if ((w >> ZS_SHIFT) >= e->arena.frames_created)
            return fail(err, ZE_CORRUPT, h, w >> ZS_SHIFT, "huge handle names no frame");
        return 0;
    }
    uint64_t z = w >> ZS_SHIFT;
    uint32_t s = obj_slot(w);
    /* The slot must name this handle back (the kernel's in-object header does). */
    if (z >= c->nz || s >= c->objs || c->slots[z * c->objs + s] != (h << 1 | LIVE))
        return fail(err, ZE_CORRUPT, h, z, "the slot of the handle does not name it");
    return 0;
}

/* Free a handle free_check() passed; returns its size. */
static uint32_t
free_checked(Engine *e, uint64_t h)
{
    uint64_t w = e->hloc[h];
    uint32_t cid = obj_class(w), size = obj_size(w);
    zclass *c = &e->classes[cid];
    if (cid == HUGE_CID) {
        arena_free(&e->arena, (uint32_t)(w >> ZS_SHIFT));
        e->pages_used--;
        e->huge_objects--;
        c->obj_used--;
        c->zspages--;
    } else {
        int32_t z = (int32_t)(w >> ZS_SHIFT);
        uint32_t s = obj_slot(w);
        c->slots[(size_t)z * c->objs + s] = (uint32_t)(c->freeobj[z] + 1) << 1;
        c->freeobj[z] = (int16_t)s;
        c->inuse[z]--;
        c->obj_used--;
        if (c->inuse[z] == 0)
            free_zspage(e, c, z);
        else
            fix_fullness_group(c, z);
    }
    release_handle(e, h);
    e->bytes_stored -= size;
    e->settled = 0;
    return size;
}

/* -- object access ---------------------------------------------------------------------- */

/* The object's bytes as one or two pieces (an object may straddle two frames of its zspage,
 * which need not be adjacent). Checks the word against the tables: no wild pointers even if
 * they were corrupted. */
typedef struct {
    char *p1, *p2;
    uint32_t n1, n2;
} pieces;

static int
locate(const Engine *e, uint64_t w, uint32_t n, pieces *out, zerr *err)
{
    uint32_t cid = obj_class(w);
    if (cid >= e->nclasses)
        return fail(err, ZE_CORRUPT, w, cid, "word names no class");
    const zclass *c = &e->classes[cid];
    if (n > c->size)
        return fail(err, ZE_CORRUPT, w, n, "object larger than its class");
    uint64_t f1;
    uint32_t inoff;
    if (cid == HUGE_CID) {
        f1 = w >> ZS_SHIFT;
        inoff = 0;
    } else {
        uint64_t z = w >> ZS_SHIFT;
        uint32_t s = obj_slot(w);
        if (z >= c->nz || s >= c->objs)
            return fail(err, ZE_CORRUPT, w, z, "word names no slot");
        size_t off = (size_t)s * c->size;
        size_t fi = (size_t)z * c->pages + (off >> PAGE_SHIFT);
        f1 = c->frames[fi];
        inoff = (uint32_t)(off & (PAGE_SIZE - 1));
        if (inoff + n > PAGE_SIZE) {
            uint64_t f2 = c->frames[fi + 1];
            if (f1 >= e->arena.frames_created || f2 >= e->arena.frames_created)
                return fail(err, ZE_CORRUPT, w, f2, "slot without its frames");
            out->p1 = frame_ptr(&e->arena, (uint32_t)f1) + inoff;
            out->n1 = PAGE_SIZE - inoff;
            out->p2 = frame_ptr(&e->arena, (uint32_t)f2);
            out->n2 = n - out->n1;
            return 0;
        }
    }
    if (f1 >= e->arena.frames_created)
        return fail(err, ZE_CORRUPT, w, f1, "slot without its frame");
    out->p1 = frame_ptr(&e->arena, (uint32_t)f1) + inoff;
    out->n1 = n;
    out->p2 = NULL;
    out->n2 = 0;
    return 0;
}

static int
get_object(const Engine *e, uint64_t w, char *dst, zerr *err)
{
    pieces pc;
    if (locate(e, w, obj_size(w), &pc, err) < 0)
        return -1;
    memcpy(dst, pc.p1, pc.n1);
    if (pc.n2)
        memcpy(dst + pc.n1, pc.p2, pc.n2);
    return 0;
}

static int
put_object(const Engine *e, uint64_t w, const char *src, uint32_t n, zerr *err)
{
    pieces pc;
    if (locate(e, w, n, &pc, err) < 0)
        return -1;
    memcpy(pc.p1, src, pc.n1);
    if (pc.n2)
        memcpy(pc.p2, src + pc.n1, pc.n2);
    return 0;
}

/* Copy n bytes from one object's pieces to another's (kernel zs_object_copy(): either side
 * may straddle two frames). */
static void
copy_pieces(const pieces *dst, const pieces *src)
{
    const char *s = src->p1;
    uint32_t sleft = src->n1;
    char *d = dst->p1;
    uint32_t dleft = dst->n1, total = src->n1 + src->n2;
    int sfirst = 1, dfirst = 1;
    while (total) {
        uint32_t k = sleft < dleft ? sleft : dleft;
        memcpy(d, s, k);
        total -= k;
        s += k;
        d += k;
        sleft -= k;
        dleft -= k;
        if (sleft == 0 && sfirst) {
            s = src->p2;
            sleft = src->n2;
            sfirst = 0;
        }
        if (dleft == 0 && dfirst) {
            d = dst->p2;
            dleft = dst->n2;
            dfirst = 0;
        }
    }
}

/* -- compaction (the kernel's __zs_compact / migrate_zspage) ---------------------------- */

/* Count frames compaction freed in pages_compacted, net of those it made. */
static void
credit(Engine *e, int64_t freed)
{
    int64_t net = freed - e->compaction_debt;
    e->pages_compacted += net > 0 ? net : 0;
    e->compaction_debt = net < 0 ? -net : 0;
}

/* The first live slot of zspage src from *s on (at most n slots): its slot word, handle and
 * handle word. Fails, as PoolCorruptionError, if inuse counted a slot that is not there or
 * the slot names a free handle. */
static int
next_live(Engine *e, zclass *c, int32_t src, size_t *s, uint32_t *sw, uint64_t *h, uint64_t *w,
          zerr *err)
{
    size_t n = c->objs, sbase = (size_t)src * n;
    while (*s < n && !(c->slots[sbase + *s] & LIVE))
        (*s)++;
    if (*s >= n)
        return fail(err, ZE_CORRUPT, (uint64_t)src, c->size, "inuse counts a slot not used");
    *sw = c->slots[sbase + *s];
    *h = *sw >> 1;
    *w = live_word(e, *h);
    if (*w == 0)
        return fail(err, ZE_CORRUPT, *h, c->size, "slot names a free handle");
    return 0;
}

/* Complete the move of handle h's object (at `from`) to its new location word nw, whose slot
 * already holds the handle: copy the bytes, point the handle there, and put slot s of src back
 * on src's free list. */
static int
finish_move(Engine *e, zclass *c, int32_t src, size_t s, uint64_t h, uint64_t nw, uint32_t size,
            pieces *from, zerr *err)
{
    pieces to;
    if (locate(e, nw, size, &to, err) < 0) /* cannot fail: its frames were made */
        return -1;
    copy_pieces(&to, from);
    e->hloc[h] = nw; /* the handle now names the new location: the move is complete */
    c->slots[(size_t)src * c->objs + s] = (uint32_t)(c->freeobj[src] + 1) << 1;
    c->freeobj[src] = (int16_t)s;
    c->inuse[src]--;
    return 0;
}

/* Move objects from src to dst in slot order until dst is full, src is empty or the budget is
 * spent; then regroup both (and free src if emptied). *moved says how many moved, also on an
 * error, after which the lists are regrouped all the same. */
static int
migrate(Engine *e, zclass *c, int32_t src, int32_t dst, int64_t budget, int64_t *moved,
        zerr *err)
{
    size_t n = c->objs, dbase = (size_t)dst * n, s = 0;
    int64_t nbytes = 0;
    int rc = 0;
    *moved = 0;
    while (*moved < budget && c->inuse[src] && c->inuse[dst] < n) {
        uint32_t sw;
        uint64_t h, w;
        rc = next_live(e, c, src, &s, &sw, &h, &w, err);
        if (rc < 0)
            break;
        uint32_t size = obj_size(w);
        pieces from;
        if (locate(e, w, size, &from, err) < 0) {
            rc = -1;
            break;
        }
        int32_t d = c->freeobj[dst];
        if (d < 0 || (size_t)d >= n) {
            rc = fail(err, ZE_CORRUPT, (uint64_t)dst, c->size, "destination free list");
            break;
        }
        /* Compaction may need a frame of dst before src gives its frames back; it is allowed
         * past mem_limit_pages for that, since every completed pass holds fewer frames. */
        int made;
        rc = make_frames(e, c, dst, (uint32_t)d, &made, err);
        e->compaction_debt += made;
        if (rc < 0)
            break;
        c->freeobj[dst] = (int16_t)((c->slots[dbase + d] >> 1) - 1);
        c->slots[dbase + d] = sw;
        c->inuse[dst]++;
        uint64_t nw = location_to_obj((uint64_t)dst, (uint32_t)d, c->cid, size);
        rc = finish_move(e, c, src, s, h, nw, size, &from, err);
        if (rc < 0)
            break;
        (*moved)++;
        nbytes += size;
        s++;
    }
    e->bytes_moved += nbytes;
    fix_fullness_group(c, dst);
    if (c->inuse[src] == 0)
        credit(e, free_zspage(e, c, src));
    else
        fix_fullness_group(c, src);
    return rc;
}

/* -- pouring (zsmalloc.py's _pour, _pour_target, _trim: what userspace adds) -------------- */

/* A free slot for an object of `size` bytes from class c: in the nearest larger class within
 * the slack bound, its fullest partly used zspage first, the first free slot on that zspage's
 * free list whose frames are made; *prev is the slot before it on the list (-1: the head).
 * Returns the class or NULL. */
static zclass *
pour_target(Engine *e, const zclass *c, uint32_t size, int32_t *dz, int32_t *ds, int32_t *prev)
{
    uint64_t limit = (uint64_t)size * (100 + POUR_SLACK_PERCENT) / 100;
    for (uint32_t cid = c->cid - 1; cid > HUGE_CID; cid--) {
        zclass *d = &e->classes[cid];
        if (d->size > limit)
            break;
        uint32_t part = d->mask & PARTIAL_MASK;
        while (part) {
            int g = top_bit(part);
            part ^= (uint32_t)1 << g;
            size_t steps = 0;
            for (int32_t z = d->heads[g]; z >= 0 && steps <= d->nz; z = d->next[z], steps++) {
                int32_t p = -1;
                size_t left = d->objs;
                for (int32_t sl = d->freeobj[z]; sl >= 0 && (uint32_t)sl < d->objs && left;
                     left--) {
                    if (!missing_frames(d, z, (uint32_t)sl)) {
                        *dz = z;
                        *ds = sl;
                        *prev = p;
                        return d;
                    }
                    p = sl;
                    sl = (int32_t)(d->slots[(size_t)z * d->objs + (size_t)sl] >> 1) - 1;
                }
            }
        }
    }
    return NULL;
}

/* Give back every frame of c's partly used zspages that no live slot reaches into (groups
 * from the emptiest, each list from its head, frames in chain order). */
static void
trim_class(Engine *e, zclass *c)
{
    size_t n = c->objs, p = c->pages, size = c->size;
    int64_t freed = 0;
    for (int g = 1; g < FULL_GROUP; g++) {
        size_t steps = 0;
        for (int32_t z = c->heads[g]; z >= 0 && steps <= c->nz; z = c->next[z], steps++) {
            for (size_t k = 0; k < p; k++) {
                uint32_t *fp = &c->frames[(size_t)z * p + k];
                if (*fp == NOFRAME)
                    continue;
                size_t lo = (k << PAGE_SHIFT) / size;
                size_t hi = (((k + 1) << PAGE_SHIFT) - 1) / size;
                if (hi > n - 1)
                    hi = n - 1;
                const uint32_t *sl = c->slots + (size_t)z * n;
                int live = 0;
                for (size_t s = lo; s <= hi && !live; s++)
                    live = sl[s] & LIVE;
                if (!live) {
                    arena_free(&e->arena, *fp);
                    *fp = NOFRAME;
                    freed++;
                }
            }
        }
    }
    if (freed) {
        c->frames_used -= freed;
        e->pages_used -= freed;
        credit(e, freed);
    }
}

/* Pour class c's emptiest zspages, in slot order, into larger classes until no object finds
 * a place or the budget is spent; then trim c's partly used zspages. *moved as migrate(). */
static int
pour(Engine *e, zclass *c, int64_t budget, int64_t *moved, zerr *err)
{
    size_t s = 0;
    int32_t src = -1;
    int64_t nbytes = 0;
    int rc = 0;
    *moved = 0;
    while (*moved < budget) {
        uint32_t part = c->mask & PARTIAL_MASK;
        if (!part)
            break;
        int32_t z = c->heads[__builtin_ctz(part)];
        if (z != src) {
            src = z;
            s = 0;
        }
        uint32_t sw;
        uint64_t h, w;
        rc = next_live(e, c, src, &s, &sw, &h, &w, err);
        if (rc < 0)
            break;
        uint32_t size = obj_size(w);
        int32_t dz, ds, prev;
        zclass *d = pour_target(e, c, size, &dz, &ds, &prev);
        if (d == NULL)
            break;
        pieces from;
        if (locate(e, w, size, &from, err) < 0) {
            rc = -1;
            break;
        }
        uint32_t *dslots = d->slots + (size_t)dz * d->objs;
        uint32_t link = dslots[ds]; /* take slot ds off dz's free list */
        if (prev < 0)
            d->freeobj[dz] = (int16_t)((link >> 1) - 1);
        else
            dslots[prev] = link;
        dslots[ds] = sw;
        d->inuse[dz]++;
        d->obj_used++;
        fix_fullness_group(d, dz);
        uint64_t nw = location_to_obj((uint64_t)dz, (uint32_t)ds, d->cid, size);
        rc = finish_move(e, c, src, s, h, nw, size, &from, err);
        if (rc < 0)
            break;
        c->obj_used--;
        (*moved)++;
        nbytes += size;
        s++;
        if (c->inuse[src] == 0) {
            credit(e, free_zspage(e, c, src));
            src = -1;
        } else {
            fix_fullness_group(c, src);
        }
    }
    e->bytes_moved += nbytes;
    if (c->zspages)
        trim_class(e, c);
    return rc;
}

/* -- packing the tables (base.py's pack_handle_table, zsmalloc_pour.py's pack_zspages) ---- */

/* Shrink an array to n elements of `size` bytes; if realloc refuses, the larger one stays. */
static void
shrink(void **p, size_t n, size_t size)
{
    void *q = realloc(*p, (n ? n : 1) * size);
    if (q != NULL)
        *p = q;
}

/* Give back the whole pages of handle-table words h0..h1-1, which are 0 and stay 0 until a
 * handle among them is issued (it then faults a zero page in). Advice only: if madvise
 * refuses, the zeros stay resident and nothing else changes. */
static void
release_table_words(Engine *e, size_t h0, size_t h1)
{
    uintptr_t lo = (uintptr_t)(e->hloc + h0), hi = (uintptr_t)(e->hloc + h1);
    lo = (lo + PAGE_SIZE - 1) & ~(uintptr_t)(PAGE_SIZE - 1);
    hi &= ~(uintptr_t)(PAGE_SIZE - 1);
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* Cut the handle table's free tail and chain its free handles lowest first, as runs: after a
 * mass delete with survivors the free handles come in long runs (a file's pages took
 * consecutive handles), and a run's words past its first are 0, so their pages go back to
 * the OS (1 GiB written, 90 % deleted: 0.73 of the table's 2.0 MiB stay resident). */
static void
pack_handles(Engine *e)
{
    size_t free_handles = e->hlen - 1 - (size_t)e->objects;
    if (free_handles < TABLE_MIN_FREE_HANDLES || free_handles * TABLE_SLACK_DIVISOR < e->hlen)
        return;
    size_t top = e->hlen - 1;
    while (top > 0 && !(e->hloc[top] & LIVE))
        top--;
    e->hlen = top + 1;
    size_t cap = e->hlen < 16 ? 16 : e->hlen;
    uint64_t *q = realloc(e->hloc, cap * sizeof(uint64_t));
    if (q != NULL) {
        e->hloc = q;
        e->hcap = cap;
    }
    uint64_t head = 0;
    size_t h = top; /* handles below h are still to look at; top is live */
    while (h > 1) {
        if (e->hloc[h - 1] & LIVE) {
            h--;
            continue;
        }
        size_t end = h; /* the run is start..end-1 */
        while (h > 1 && !(e->hloc[h - 1] & LIVE))
            h--;
        size_t start = h;
        memset(e->hloc + start + 1, 0, (end - start - 1) * sizeof(uint64_t));
        e->hloc[start] = head << 1 | (uint64_t)(end - start - 1) << RUN_SHIFT;
        release_table_words(e, start + 1, end);
        head = start;
    }
    e->hfree = head;
}

/* Move live zspage z of class c to the free number t (zsmalloc_pour.py's renumber). */
static void
renumber(Engine *e, zclass *c, int32_t z, int32_t t)
{
    size_t p = c->pages, n = c->objs;
    memcpy(c->frames + (size_t)t * p, c->frames + (size_t)z * p, p * sizeof(uint32_t));
    memcpy(c->slots + (size_t)t * n, c->slots + (size_t)z * n, n * sizeof(uint32_t));
    c->inuse[t] = c->inuse[z];
    c->freeobj[t] = c->freeobj[z];
    uint8_t g = c->group[z];
    c->group[t] = g;
    int32_t before = c->prev[z], after = c->next[z];
    c->prev[t] = before;
    c->next[t] = after;
    if (before >= 0)
        c->next[before] = t;
    else
        c->heads[g] = t;
    if (after >= 0)
        c->prev[after] = t;
    c->group[z] = UNUSED;
    const uint64_t keep = ((uint64_t)1 << ZS_SHIFT) - 1;
    const uint32_t *sl = c->slots + (size_t)t * n;
    for (size_t s = 0; s < n; s++) {
        if (sl[s] & LIVE) {
            uint64_t h = sl[s] >> 1;
            if (h < e->hlen)
                e->hloc[h] = (e->hloc[h] & keep) | (uint64_t)t << ZS_SHIFT;
        }
    }
}

static int
cmp_i32(const void *x, const void *y)
{
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

/* Renumber c's live zspages into its lowest numbers and cut its arrays to them. */
static void
pack_zspages(Engine *e, zclass *c)
{
    if (c->nfree_zs == 0 || c->nfree_zs * TABLE_SLACK_DIVISOR < c->nz)
        return;
    qsort(c->free_zs, c->nfree_zs, sizeof(int32_t), cmp_i32);
    size_t lo = 0;
    int64_t top = (int64_t)c->nz - 1;
    while (lo < c->nfree_zs && c->free_zs[lo] < top) {
        if (c->group[top] == UNUSED) {
            top--;
            continue;
        }
        renumber(e, c, (int32_t)top, c->free_zs[lo]);
        lo++;
        top--;
    }
    while (top >= 0 && c->group[top] == UNUSED)
        top--;
    size_t nz = (size_t)(top + 1);
    c->nz = nz;
    c->nfree_zs = 0;
    shrink((void **)&c->frames, nz * c->pages, sizeof(uint32_t));
    shrink((void **)&c->slots, nz * c->objs, sizeof(uint32_t));
    shrink((void **)&c->inuse, nz, sizeof(uint16_t));
    shrink((void **)&c->freeobj, nz, sizeof(int16_t));
    shrink((void **)&c->group, nz, sizeof(uint8_t));
    shrink((void **)&c->prev, nz, sizeof(int32_t));
    shrink((void **)&c->next, nz, sizeof(int32_t));
    shrink((void **)&c->free_zs, nz, sizeof(int32_t));
    c->zcap = nz; /* every array holds at least nz: a refused shrink left a larger one */
}

/* One bounded slice of zs_compact(): classes from the largest down, each drained while
 * zs_can_compact() says a whole zspage could be freed; a cursor remembers where it stopped. */
static int
compact_step(Engine *e, int64_t max_objects, int pour_too, int64_t *out, zerr *err)
{
    int64_t moved = 0;
    int rc = 0;
    *out = 0;
    if (max_objects <= 0 || e->ncompact == 0)
        return 0;
    uint32_t start = e->compact_cursor, i = start;
    for (;;) {
        zclass *c = &e->classes[e->compact_order[i]];
        int64_t n = c->objs;
        while (rc == 0 && moved < max_objects && (c->zspages * n - c->obj_used) >= n) {
            uint32_t part = c->mask & PARTIAL_MASK;
            if (!part) {
                rc = fail(err, ZE_CORRUPT, c->size, 0, "can_compact > 0, no partial zspage");
                break;
            }
            /* src: the emptiest non-empty zspage; dst: the fullest non-full one. Free slots
             * worth a whole zspage imply two partly used zspages, so they differ. */
            int32_t src = c->heads[__builtin_ctz(part)];
            int32_t dst = c->heads[top_bit(part)];
            if (dst == src)
                dst = c->next[src];
            if (dst < 0) {
                rc = fail(err, ZE_CORRUPT, c->size, 0, "can_compact > 0, one partial zspage");
                break;
            }
            int64_t k;
            rc = migrate(e, c, src, dst, max_objects - moved, &k, err);
            moved += k;
        }
        if (rc == 0 && pour_too && moved < max_objects && !e->settled && c->zspages) {
            int64_t k;
            rc = pour(e, c, max_objects - moved, &k, err);
            moved += k;
        }
        if (rc < 0 || moved >= max_objects)
            break;
        i = i + 1 < e->ncompact ? i + 1 : 0;
        if (i == start)
            break;
    }
    e->compact_cursor = i;
    e->objects_moved += moved;
    if (rc == 0 && moved == 0 && pour_too && !e->settled) {
        e->settled = 1;
        /* Settled: the tables' free tails can go. */
        for (uint32_t k = 0; k < e->ncompact; k++)
            pack_zspages(e, &e->classes[e->compact_order[k]]);
        pack_handles(e);
        arena_pack(&e->arena);
    }
    *out = moved;
    return rc;
}

/* zsmalloc.py's can_compact(): per class the kernel's count, or until settled the residue
 * estimate if more, summed in bytes. */
static int64_t
can_compact(const Engine *e, int pour_too)
{
    int64_t total = 0;
    int settled = e->settled || !pour_too;
    for (uint32_t i = 0; i < e->ncompact; i++) {
        const zclass *c = &e->classes[e->compact_order[i]];
        int64_t n = c->objs;
        int64_t kernel = class_can_compact(c) << PAGE_SHIFT;
        if (!settled) {
            /* frames_used - obj_used * pages / objs frames, in bytes (rounded down) */
            int64_t num = (c->frames_used * n - c->obj_used * (int64_t)c->pages) << PAGE_SHIFT;
            int64_t residue = num >= 0 ? num / n : -((-num + n - 1) / n);
            if (residue > kernel)
                kernel = residue;
        }
        total += kernel;
    }
    return total >> PAGE_SHIFT;
}

/* -- Python glue ------------------------------------------------------------------------ */

/* Every method starts here: the pool must be set up, open and not inside a released-GIL
 * loop of another thread. */
static int
enter(Engine *e)
{
    if (!e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "zsmalloc engine not initialised");
        return -1;
    }
    if (e->closed) {
        PyErr_SetString(PyExc_ValueError, "the pool is closed");
        return -1;
    }
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the pool is in use by another thread");
        return -1;
    }
    return 0;
}

/* A handle from Python: anything that is not a non-negative int below 2**64 becomes 0, which
 * is never a valid handle (base.py: a non-int or unknown handle is InvalidHandleError). */
static uint64_t
handle_from(PyObject *o)
{
    if (!PyLong_Check(o)) {
        if (!PyIndex_Check(o))
            return 0;
        PyObject *i = PyNumber_Index(o);
        if (i == NULL) {
            PyErr_Clear();
            return 0;
        }
        uint64_t h = handle_from(i);
        Py_DECREF(i);
        return h;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or too large */
        return 0;
    }
    return (uint64_t)v;
}

static PyObject *
raise_handle(PyObject *o, const char *what)
{
    PyObject *r = PyObject_Repr(o);
    if (r == NULL)
        return NULL;
    PyErr_Format(InvalidHandleError, "handle %U %s", r, what);
    Py_DECREF(r);
    return NULL;
}

/* One element of a buffer of struct format letter `code`; a negative one is UINT64_MAX. */
static uint64_t
buffer_item(char code, const char *p)
{
#define UNSIGNED(type)                                                                     \
    do {                                                                                   \
        type x;                                                                            \
        memcpy(&x, p, sizeof(x)); /* the buffer need not be aligned */                     \
        return (uint64_t)x;                                                                \
    } while (0)
#define SIGNED(type)                                                                       \
    do {                                                                                   \
        type x;                                                                            \
        memcpy(&x, p, sizeof(x));                                                          \
        return x < 0 ? UINT64_MAX : (uint64_t)x;                                           \
    } while (0)
    switch (code) {
    case 'B': UNSIGNED(unsigned char);
    case 'H': UNSIGNED(unsigned short);
    case 'I': UNSIGNED(unsigned int);
    case 'L': UNSIGNED(unsigned long);
    case 'Q': UNSIGNED(unsigned long long);
    case 'b': SIGNED(signed char);
    case 'h': SIGNED(short);
    case 'i': SIGNED(int);
    case 'l': SIGNED(long);
    default: SIGNED(long long);
    }
#undef UNSIGNED
#undef SIGNED
}

/* A sequence of ints (any list, tuple or array) as a malloc'd uint64_t array. Values that are
 * negative, too large or not ints become 0 or UINT64_MAX (invalid as a handle and as a size). *n is set; the
 * caller frees *out (also when *n == 0). */
static int
u64_array(PyObject *seq, uint64_t **out, Py_ssize_t *n)
{
    *out = NULL;
    *n = 0;
    Py_buffer view;
    if (PyObject_CheckBuffer(seq) && PyObject_GetBuffer(seq, &view, PyBUF_FORMAT | PyBUF_ND) == 0) {
        const char *fmt = view.format ? view.format : "B";
        if (fmt[0] == '@' || fmt[0] == '=')
            fmt++;
        int ok = view.ndim == 1 && fmt[1] == '\0' && strchr("BHILQbhilq", fmt[0]) != NULL;
        if (ok) {
            Py_ssize_t len = view.shape ? view.shape[0] : view.len / view.itemsize;
            uint64_t *a = malloc((size_t)(len ? len : 1) * sizeof(uint64_t));
            if (a == NULL) {
                PyBuffer_Release(&view);
                PyErr_NoMemory();
                return -1;
            }
            const char *p = view.buf;
            for (Py_ssize_t i = 0; i < len; i++, p += view.itemsize)
                a[i] = buffer_item(fmt[0], p);
            PyBuffer_Release(&view);
            *out = a;
            *n = len;
            return 0;
        }
        PyBuffer_Release(&view);
    }
    PyErr_Clear();
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of ints");
    if (fast == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    uint64_t *a = malloc((size_t)(len ? len : 1) * sizeof(uint64_t));
    if (a == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < len; i++) {
        a[i] = handle_from(items[i]); /* 0 if not a valid int: no handle, no size */
    }
    Py_DECREF(fast);
    *out = a;
    *n = len;
    return 0;
}

/* An array.array of typecode `code` holding n elements of `bytes` bytes each from buf. */
static PyObject *
new_array(char code, const void *buf, size_t n, size_t bytes)
{
    return PyObject_CallFunction(ArrayType, "Cy#", (int)code, (const char *)buf,
                                 (Py_ssize_t)(n * bytes));
}

/* -- construction ----------------------------------------------------------------------- */

static void
engine_free_state(Engine *e)
{
    if (e->classes) {
        for (uint32_t i = 0; i < e->nclasses; i++) {
            class_empty_out(&e->classes[i]);
            free(e->classes[i].group_of);
        }
        free(e->classes);
        e->classes = NULL;
    }
    free(e->compact_order);
    e->compact_order = NULL;
    free(e->hloc);
    e->hloc = NULL;
    e->hlen = e->hcap = 0;
    e->hfree = 0;
    arena_close(&e->arena);
}

static void
Engine_dealloc(Engine *e)
{
    engine_free_state(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* Kernel get_fullness_group(). */
static uint8_t
fullness_group(uint32_t inuse, uint32_t objs)
{
    if (inuse == 0)
        return 0;
    if (inuse == objs)
        return FULL_GROUP;
    return (uint8_t)(100 * inuse / objs / 10 + 1);
}

/* Engine(classes, cid_of_size, huge_size, mem_limit_pages): classes is a sequence of
 * (index, size, pages_per_zspage, objs_per_zspage, huge) from the largest down (class id 0
 * is the huge class), cid_of_size a bytes of 4097 class ids by request size. */
static int
Engine_init(Engine *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"classes", "cid_of_size", "huge_size", "mem_limit_pages", NULL};
    PyObject *classes;
    Py_buffer cids;
    unsigned int huge_size;
    long long limit = 0;
    if (e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "zsmalloc engine initialised twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oy*I|L", kwlist, &classes, &cids, &huge_size,
                                     &limit))
        return -1;
    int rc = -1;
    PyObject *fast = NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "mem_limit_pages must be >= 0 (0 = unlimited)");
        goto out;
    }
    if (cids.len != PAGE_SIZE + 1) {
        PyErr_SetString(PyExc_ValueError, "cid_of_size must have 4097 entries");
        goto out;
    }
    fast = PySequence_Fast(classes, "classes must be a sequence");
    if (fast == NULL)
        goto out;
    Py_ssize_t nc = PySequence_Fast_GET_SIZE(fast);
    if (nc < 1 || nc > MAX_CLASSES) {
        PyErr_SetString(PyExc_ValueError, "between 1 and 256 classes");
        goto out;
    }
    e->classes = calloc((size_t)nc, sizeof(zclass));
    e->compact_order = calloc((size_t)nc, sizeof(uint32_t));
    if (e->classes == NULL || e->compact_order == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    e->nclasses = (uint32_t)nc;
    for (Py_ssize_t i = 0; i < nc; i++) {
        zclass *c = &e->classes[i];
        unsigned int index, size, pages, objs;
        int huge;
        PyObject *row = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyTuple_Check(row)) {
            PyErr_SetString(PyExc_TypeError, "a class is a tuple (index, size, pages, objs, huge)");
            goto out;
        }
        if (!PyArg_ParseTuple(row, "IIIIp;a class is (index, size, pages, objs, huge)", &index,
                              &size, &pages, &objs, &huge))
            goto out;
        if (size < 1 || size > PAGE_SIZE || pages < 1 || pages > 64 || objs < 1 ||
            objs > SLOT_MASK + 1 || (uint64_t)objs * size > (uint64_t)pages * PAGE_SIZE ||
            huge != (pages == 1 && objs == 1) || (i == HUGE_CID) != huge ||
            (huge && size != PAGE_SIZE)) {
            PyErr_Format(PyExc_ValueError, "class %zd (size %u, %u pages, %u objects) is not "
                         "a zsmalloc class (the huge one, 4096 B, must be first, and only it)",
                         i, size, pages, objs);
            goto out;
        }
        c->cid = (uint32_t)i;
        c->index = index;
        c->size = size;
        c->pages = pages;
        c->objs = objs;
        c->huge = huge;
        c->group_of = malloc(objs + 1);
        if (c->group_of == NULL) {
            PyErr_NoMemory();
            goto out;
        }
        for (uint32_t k = 0; k <= objs; k++)
            c->group_of[k] = fullness_group(k, objs);
        class_empty_out(c);
        if (!huge)
            e->compact_order[e->ncompact++] = (uint32_t)i;
    }
    const unsigned char *cs = cids.buf;
    for (uint32_t s = 1; s <= PAGE_SIZE; s++) {
        /* Memory safety rests on this: every object fits the slot of its class. */
        if (cs[s] >= nc || e->classes[cs[s]].size < s ||
            (s >= huge_size) != (cs[s] == HUGE_CID)) {
            PyErr_Format(PyExc_ValueError, "cid_of_size[%u] = %u does not fit", s, cs[s]);
            goto out;
        }
    }
    memcpy(e->cid_of_size, cs, PAGE_SIZE + 1);
    e->huge_size = huge_size;
    e->hloc = malloc(16 * sizeof(uint64_t));
    if (e->hloc == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    e->hcap = 16;
    e->hlen = 1;
    e->hloc[0] = 0;
    e->mem_limit_pages = limit;
    e->settled = 1;
    e->ready = 1;
    rc = 0;
out:
    if (rc < 0)
        engine_free_state(e);
    Py_XDECREF(fast);
    PyBuffer_Release(&cids);
    return rc;
}

/* -- methods: one object -------------------------------------------------------------- */

static PyObject *
Engine_malloc(Engine *e, PyObject *arg)
{
    if (enter(e) < 0)
        return NULL;
    long long size = PyLong_AsLongLong(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    zerr err;
    uint64_t h;
    if (zs_alloc(e, size < 0 ? 0 : (uint64_t)size, &h, &err) < 0) {
        if (err.code == ZE_SIZE)
            return PyErr_Format(InvalidSizeError, "object size %lld outside 1..%u", size,
                                PAGE_SIZE);
        return raise_zerr(&err);
    }
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *
Engine_store(Engine *e, PyObject *arg)
{
    if (enter(e) < 0)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    zerr err;
    uint64_t h;
    PyObject *result = NULL;
    if (zs_alloc(e, (uint64_t)data.len, &h, &err) < 0 ||
        put_object(e, e->hloc[h], data.buf, (uint32_t)data.len, &err) < 0)
        raise_zerr(&err);
    else
        result = PyLong_FromUnsignedLongLong(h);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *
Engine_write(Engine *e, PyObject *args)
{
    PyObject *ho;
    Py_buffer data;
    if (enter(e) < 0 || !PyArg_ParseTuple(args, "Oy*:write", &ho, &data))
        return NULL;
    PyObject *result = NULL;
    uint64_t w = live_word(e, handle_from(ho));
    zerr err;
    if (w == 0)
        raise_handle(ho, "is not allocated");
    else if ((uint64_t)data.len > obj_size(w))
        PyErr_Format(InvalidSizeError, "write of %zd bytes into a %u-byte object", data.len,
                     obj_size(w));
    else if (put_object(e, w, data.buf, (uint32_t)data.len, &err) < 0)
        raise_zerr(&err);
    else
        result = Py_NewRef(Py_None);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *
read_word(const Engine *e, uint64_t w)
{
    uint32_t n = obj_size(w);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    zerr err;
    if (out != NULL && get_object(e, w, PyBytes_AS_STRING(out), &err) < 0) {
        Py_DECREF(out);
        return raise_zerr(&err);
    }
    return out;
}

static PyObject *
Engine_read(Engine *e, PyObject *ho)
{
    if (enter(e) < 0)
        return NULL;
    uint64_t w = live_word(e, handle_from(ho));
    if (w == 0)
        return raise_handle(ho, "is not allocated");
    return read_word(e, w);
}

static PyObject *
Engine_object_size(Engine *e, PyObject *ho)
{
    if (enter(e) < 0)
        return NULL;
    uint64_t w = live_word(e, handle_from(ho));
    if (w == 0)
        return raise_handle(ho, "is not allocated");
    return PyLong_FromUnsignedLong(obj_size(w));
}

static PyObject *
Engine_free(Engine *e, PyObject *ho)
{
    if (enter(e) < 0)
        return NULL;
    uint64_t h = handle_from(ho);
    zerr err;
    if (free_check(e, h, &err) < 0) {
        if (err.code == ZE_HANDLE)
            return raise_handle(ho, "is not allocated");
        return raise_zerr(&err);
    }
    return PyLong_FromUnsignedLong(free_checked(e, h));
}

/* -- methods: batches ----------------------------------------------------------------- */

/* The live words of `handles`, or InvalidHandleError naming the first bad one. */
static uint64_t *
words_of(Engine *e, PyObject *handles, Py_ssize_t *n)
{
    uint64_t *hs;
    if (u64_array(handles, &hs, n) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < *n; i++) {
        uint64_t w = live_word(e, hs[i]);
        if (w == 0) {
            PyObject *item = PySequence_GetItem(handles, i);
            if (item != NULL) {
                raise_handle(item, "is not allocated");
                Py_DECREF(item);
            }
            free(hs);
            return NULL;
        }
        hs[i] = w;
    }
    return hs;
}

static PyObject *
Engine_read_many(Engine *e, PyObject *handles)
{
    if (enter(e) < 0)
        return NULL;
    Py_ssize_t n;
    uint64_t *ws = words_of(e, handles, &n);
    if (ws == NULL)
        return NULL;
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *b = read_word(e, ws[i]);
        if (b == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, b);
    }
    free(ws);
    return out;
}

static PyObject *
Engine_read_joined(Engine *e, PyObject *handles)
{
    if (enter(e) < 0)
        return NULL;
    Py_ssize_t n;
    uint64_t *ws = words_of(e, handles, &n);
    if (ws == NULL)
        return NULL;
    PyObject *blob = NULL, *sizes = NULL, *result = NULL;
    uint16_t *sz = malloc((size_t)(n ? n : 1) * sizeof(uint16_t));
    if (sz == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        sz[i] = (uint16_t)obj_size(ws[i]);
        total += sz[i];
    }
    blob = PyBytes_FromStringAndSize(NULL, total);
    if (blob == NULL)
        goto out;
    char *p = PyBytes_AS_STRING(blob);
    zerr err;
    int rc = 0;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        rc = get_object(e, ws[i], p, &err);
        p += sz[i];
    }
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc < 0) {
        raise_zerr(&err);
        goto out;
    }
    sizes = new_array('H', sz, (size_t)n, sizeof(uint16_t));
    if (sizes != NULL)
        result = PyTuple_Pack(2, blob, sizes);
out:
    Py_XDECREF(blob);
    Py_XDECREF(sizes);
    free(sz);
    free(ws);
    return result;
}

static PyObject *
Engine_store_many(Engine *e, PyObject *args)
{
    PyObject *sizes_obj;
    Py_buffer blob;
    if (enter(e) < 0 || !PyArg_ParseTuple(args, "y*O:store_many", &blob, &sizes_obj))
        return NULL;
    PyObject *result = NULL;
    uint64_t *sizes = NULL;
    Py_ssize_t n;
    if (u64_array(sizes_obj, &sizes, &n) < 0)
        goto out;
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (sizes[i] == 0 || sizes[i] > PAGE_SIZE) {
            PyErr_Format(InvalidSizeError, "object %zd: size outside 1..%u", i, PAGE_SIZE);
            goto out;
        }
        total += sizes[i];
    }
    if (total > (uint64_t)blob.len) {
        PyErr_Format(InvalidSizeError, "sizes add up to %llu bytes, the blob has %zd",
                     (unsigned long long)total, blob.len);
        goto out;
    }
    /* The handles overwrite the sizes in place as the objects are stored. */
    Py_ssize_t done = 0;
    zerr err = {0};
    int rc = 0;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    const char *p = blob.buf;
    for (; done < n; done++) {
        uint64_t h, size = sizes[done];
        if (zs_alloc(e, size, &h, &err) < 0)
            break;
        rc = put_object(e, e->hloc[h], p, (uint32_t)size, &err);
        sizes[done] = h;
        p += size;
        if (rc < 0) {
            done++;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc < 0 || (err.code != ZE_NONE && err.code != ZE_FULL && err.code != ZE_HANDLES &&
                   err.code != ZE_NOMEM)) {
        raise_zerr(&err); /* corruption: never a full pool */
        goto out;
    }
    result = new_array('Q', sizes, (size_t)done, sizeof(uint64_t));
out:
    free(sizes);
    PyBuffer_Release(&blob);
    return result;
}

static PyObject *
Engine_free_many(Engine *e, PyObject *handles)
{
    if (enter(e) < 0)
        return NULL;
    Py_ssize_t n;
    uint64_t *hs;
    if (u64_array(handles, &hs, &n) < 0)
        return NULL;
    PyObject *result = NULL;
    uint16_t *sz = malloc((size_t)(n ? n : 1) * sizeof(uint16_t));
    if (sz == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    /* Check every handle first, so that a refused batch frees nothing: each checked one is
     * marked (LIVE cleared) so that a handle given twice is refused as freed; then the marks
     * are undone. */
    zerr err;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        if (free_check(e, hs[i], &err) < 0)
            break;
        e->hloc[hs[i]] &= ~(uint64_t)LIVE;
    }
    for (Py_ssize_t k = 0; k < i; k++)
        e->hloc[hs[k]] |= LIVE;
    if (i < n) {
        if (err.code == ZE_HANDLE) {
            PyObject *item = PySequence_GetItem(handles, i);
            if (item != NULL) {
                raise_handle(item, "is not allocated");
                Py_DECREF(item);
            }
        } else {
            raise_zerr(&err);
        }
        goto out;
    }
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    arena_defer(&e->arena);
    for (i = 0; i < n; i++)
        sz[i] = (uint16_t)free_checked(e, hs[i]);
    arena_undefer(&e->arena);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    result = new_array('H', sz, (size_t)n, sizeof(uint16_t));
out:
    free(sz);
    free(hs);
    return result;
}

/* -- methods: compaction ------------------------------------------------------------- */

static PyObject *
Engine_can_compact(Engine *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"pour", NULL};
    int pour_too = 1;
    if (!e->ready) { /* a closed pool answers 0, so that statistics() still work */
        PyErr_SetString(PyExc_RuntimeError, "zsmalloc engine not initialised");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:can_compact", kwlist, &pour_too))
        return NULL;
    return PyLong_FromLongLong(can_compact(e, pour_too));
}

static PyObject *
Engine_compact_step(Engine *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_objects", "pour", NULL};
    long long max_objects = 64;
    int pour_too = 1;
    if (enter(e) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "|Lp:compact_step", kwlist, &max_objects,
                                     &pour_too))
        return NULL;
    int64_t moved;
    zerr err;
    int rc;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    arena_defer(&e->arena);
    rc = compact_step(e, max_objects, pour_too, &moved, &err);
    arena_undefer(&e->arena);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc < 0)
        return raise_zerr(&err);
    return PyLong_FromLongLong(moved);
}

static PyObject *
Engine_compact(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (enter(e) < 0)
        return NULL;
    int64_t before = e->pages_compacted, moved;
    zerr err;
    int rc;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    arena_defer(&e->arena);
    while ((rc = compact_step(e, COMPACT_SLICE, 1, &moved, &err)) == 0 && moved)
        ;
    if (rc == 0)
        arena_trim(&e->arena);
    arena_undefer(&e->arena);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (rc < 0)
        return raise_zerr(&err);
    return PyLong_FromLongLong(e->pages_compacted - before);
}

static PyObject *
Engine_trim(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (enter(e) < 0)
        return NULL;
    return PyLong_FromSize_t(arena_trim(&e->arena));
}

static PyObject *
Engine_reset_max_pages(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (enter(e) < 0)
        return NULL;
    e->max_pages_used = e->pages_used;
    Py_RETURN_NONE;
}

static PyObject *
Engine_close(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the pool is in use by another thread");
        return NULL;
    }
    if (e->ready && !e->closed) {
        /* Keep the class table (statistics() still answer) but drop every zspage, handle
         * and frame: the mappings go away. */
        for (uint32_t i = 0; i < e->nclasses; i++) {
            zclass *c = &e->classes[i];
            class_empty_out(c);
            c->zspages = c->obj_used = c->frames_used = 0;
        }
        arena_close(&e->arena);
        e->hlen = 1;
        e->hfree = 0;
        e->pages_used = e->objects = e->bytes_stored = e->huge_objects = e->zspages = 0;
        e->closed = 1;
    }
    Py_RETURN_NONE;
}

/* -- methods: statistics, export, checks ----------------------------------------------- */

/* One row per distinct class, in class-id order: (index, size, histogram of groups 1..11,
 * obj_allocated, obj_used, pages_used, pages_per_zspage, objs_per_zspage, freeable). The
 * histogram walks the fullness lists, as zsmalloc.py's class_statistics() does. */
static PyObject *
Engine_class_rows(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (!e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "zsmalloc engine not initialised");
        return NULL;
    }
    PyObject *rows = PyList_New(e->nclasses);
    for (uint32_t i = 0; rows != NULL && i < e->nclasses; i++) {
        const zclass *c = &e->classes[i];
        long long hist[NR_GROUPS] = {0};
        if (c->huge) {
            hist[FULL_GROUP] = c->zspages;
        } else {
            for (int g = 0; g < NR_GROUPS; g++) {
                size_t steps = 0;
                for (int32_t z = c->heads[g]; z >= 0 && steps <= c->nz; z = c->next[z], steps++)
                    hist[g]++;
            }
        }
        PyObject *row = Py_BuildValue(
            "II(LLLLLLLLLLL)LLLIIL", c->index, c->size, hist[1], hist[2], hist[3], hist[4],
            hist[5], hist[6], hist[7], hist[8], hist[9], hist[10], hist[11],
            (long long)(c->zspages * c->objs), (long long)c->obj_used,
            (long long)(c->huge ? c->zspages : c->frames_used), c->pages, c->objs,
            (long long)(c->huge ? 0 : class_can_compact(c)));
        if (row == NULL)
            Py_CLEAR(rows);
        else
            PyList_SET_ITEM(rows, i, row);
    }
    return rows;
}

/* Bytes of C bookkeeping: the engine's own tables and every array it allocated. */
static size_t
heap_bytes(const Engine *e)
{
    size_t total = 0;
    if (!e->ready)
        return 0;
    total += e->nclasses * (sizeof(zclass) + sizeof(uint32_t));
    for (uint32_t i = 0; i < e->nclasses; i++) {
        const zclass *c = &e->classes[i];
        total += c->objs + 1 + c->zcap * class_zspage_bytes(c);
    }
    total += e->hcap * sizeof(uint64_t);
    total += e->arena.segcap * sizeof(char *) + e->arena.freecap * sizeof(uint32_t);
    return total;
}

static PyObject *
Engine_heap_bytes(Engine *e, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(heap_bytes(e));
}

static PyObject *
Engine_segment_ranges(Engine *e, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New((Py_ssize_t)e->arena.nseg);
    for (size_t i = 0; out != NULL && i < e->arena.nseg; i++) {
        uintptr_t a = (uintptr_t)e->arena.seg[i];
        PyObject *r = Py_BuildValue("(KK)", (unsigned long long)a,
                                    (unsigned long long)(a + SEGMENT_BYTES));
        if (r == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, r);
    }
    return out;
}

static PyObject *
Engine_segment_addresses(Engine *e, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New((Py_ssize_t)e->arena.nseg);
    for (size_t i = 0; out != NULL && i < e->arena.nseg; i++) {
        PyObject *r = PyLong_FromUnsignedLongLong((uintptr_t)e->arena.seg[i]);
        if (r == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, r);
    }
    return out;
}

/* Set a dict item, stealing the value's reference; -1 on failure. */
static int
put(PyObject *d, const char *key, PyObject *value)
{
    if (value == NULL)
        return -1;
    int rc = PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
    return rc;
}

/* The whole state as Python values (arrays as bytes), for the Python checker and the tests:
 * zsmalloc_check.py verifies it exactly as it verifies a Python pool. */
static PyObject *
Engine_export(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (enter(e) < 0)
        return NULL;
    PyObject *d = PyDict_New(), *classes = NULL;
    if (d == NULL)
        return NULL;
    size_t nflat = e->arena.free_count;
    uint32_t *flat = malloc((nflat ? nflat : 1) * sizeof(uint32_t));
    if (flat == NULL) {
        Py_DECREF(d);
        return PyErr_NoMemory();
    }
    arena_free_list(&e->arena, flat);
    PyObject *free_frames = PyBytes_FromStringAndSize((const char *)flat, (Py_ssize_t)(nflat * 4));
    free(flat);
    if (put(d, "hloc", PyBytes_FromStringAndSize((const char *)e->hloc,
                                                 (Py_ssize_t)(e->hlen * 8))) < 0 ||
        put(d, "hfree", PyLong_FromUnsignedLongLong(e->hfree)) < 0 ||
        put(d, "free_frames", free_frames) < 0 ||
        put(d, "warm_frames", PyBytes_FromStringAndSize((const char *)e->arena.warm,
                                                        (Py_ssize_t)(e->arena.nwarm * 4))) < 0 ||
        put(d, "frames_created", PyLong_FromUnsignedLongLong(e->arena.frames_created)) < 0 ||
        put(d, "compact_cursor", PyLong_FromUnsignedLong(e->compact_cursor)) < 0 ||
        put(d, "compaction_debt", PyLong_FromLongLong(e->compaction_debt)) < 0 ||
        put(d, "zspages", PyLong_FromLongLong(e->zspages)) < 0 ||
        put(d, "settled", PyBool_FromLong(e->settled)) < 0)
        goto fail;
    classes = PyList_New(e->nclasses);
    if (classes == NULL)
        goto fail;
    for (uint32_t i = 0; i < e->nclasses; i++) {
        const zclass *c = &e->classes[i];
        size_t nz = c->nz;
        PyObject *heads = Py_BuildValue("[iiiiiiiiiiii]", c->heads[0], c->heads[1],
                                        c->heads[2], c->heads[3], c->heads[4], c->heads[5],
                                        c->heads[6], c->heads[7], c->heads[8], c->heads[9],
                                        c->heads[10], c->heads[11]);
        if (heads == NULL)
            goto fail;
        PyObject *row = Py_BuildValue(
            "{sIsIsIsIsNsy#sy#sy#sy#sy#sy#sy#sy#sIsLsLsL}", "index", c->index, "size", c->size,
            "pages", c->pages, "objs", c->objs, "heads", heads, "frames",
            (const char *)c->frames, (Py_ssize_t)(nz * c->pages * 4), "slots",
            (const char *)c->slots, (Py_ssize_t)(nz * c->objs * 4), "inuse",
            (const char *)c->inuse, (Py_ssize_t)(nz * 2), "freeobj", (const char *)c->freeobj,
            (Py_ssize_t)(nz * 2), "group", (const char *)c->group, (Py_ssize_t)nz, "prev",
            (const char *)c->prev, (Py_ssize_t)(nz * 4), "next", (const char *)c->next,
            (Py_ssize_t)(nz * 4), "free_zs", (const char *)c->free_zs,
            (Py_ssize_t)(c->nfree_zs * 4), "mask", c->mask, "zspages", (long long)c->zspages,
            "obj_used", (long long)c->obj_used, "frames_used", (long long)c->frames_used);
        if (row == NULL)
            goto fail;
        PyList_SET_ITEM(classes, i, row);
    }
    if (PyDict_SetItemString(d, "classes", classes) < 0)
        goto fail;
    Py_DECREF(classes);
    return d;
fail:
    Py_XDECREF(classes);
    Py_DECREF(d);
    return NULL;
}

/* Resident bytes of the pages under [p, p + n) (mincore), for _table_resident. */
static size_t
resident_bytes(const void *p, size_t n)
{
    if (p == NULL || n == 0)
        return 0;
    uintptr_t lo = (uintptr_t)p & ~(uintptr_t)(PAGE_SIZE - 1);
    uintptr_t hi = ((uintptr_t)p + n + PAGE_SIZE - 1) & ~(uintptr_t)(PAGE_SIZE - 1);
    size_t pages = (hi - lo) / PAGE_SIZE, found = 0;
    unsigned char *vec = malloc(pages);
    if (vec == NULL)
        return 0;
    if (mincore((void *)lo, hi - lo, vec) == 0)
        for (size_t i = 0; i < pages; i++)
            found += vec[i] & 1;
    free(vec);
    return found * PAGE_SIZE;
}

/* How much of the handle table and of the free-frame stack is resident, and how large their
 * allocations are: what packing gives back to the OS (tests/pool/test_pool_memory.py). */
static PyObject *
Engine_table_resident(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (enter(e) < 0)
        return NULL;
    size_t hbytes = e->hcap * sizeof(uint64_t), fbytes = e->arena.freecap * sizeof(uint32_t);
    return Py_BuildValue("{s:n,s:n,s:n,s:n}", "handles", (Py_ssize_t)hbytes,
                         "handles_resident", (Py_ssize_t)resident_bytes(e->hloc, hbytes),
                         "free_frames", (Py_ssize_t)fbytes, "free_frames_resident",
                         (Py_ssize_t)resident_bytes(e->arena.free_frames, fbytes));
}

/* What the export cannot show: capacities, segments, the warm stack's bound, madvise. */
static PyObject *
Engine_check_native(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (enter(e) < 0)
        return NULL;
    const arena_t *a = &e->arena;
    const char *bad = NULL;
    if (a->madvise_failures)
        bad = "madvise(MADV_DONTNEED) failed: freed frames may still be resident";
    else if (a->npending || a->defer)
        bad = "frames released but not given back outside a batch";
    else if (a->nseg > a->segcap || a->nfree > a->freecap || a->nwarm > WARM_FRAMES)
        bad = "arena stacks overflow their capacity";
    else if (a->frames_created > (uint64_t)a->nseg * SEGMENT_FRAMES)
        bad = "frames beyond the mapped segments";
    else if (a->freecap < a->frames_created)
        bad = "free-frame stack has no room for every frame";
    else if (a->npending > a->nfree)
        bad = "more pending frames than free-stack entries";
    size_t counted = 0;
    for (size_t i = 0; bad == NULL && i < a->nfree; i++) {
        uint32_t f = a->free_frames[i];
        if (f & RUN_TAG) {
            bad = "a free-frame run count without its first frame";
        } else if (i + 1 < a->nfree && (a->free_frames[i + 1] & RUN_TAG)) {
            uint64_t n = a->free_frames[++i] & ~RUN_TAG;
            if (n < 2 || f + n > a->frames_created)
                bad = "a free-frame run too short or past the frames made";
            counted += n;
        } else {
            counted++;
        }
    }
    if (bad == NULL && counted != a->free_count)
        bad = "the free-frame count differs from the free stack";
    else if (e->hlen < 1 || e->hlen > e->hcap)
        bad = "handle table length outside its capacity";
    else if (e->compact_cursor >= (e->ncompact ? e->ncompact : 1))
        bad = "compaction cursor outside the classes";
    for (uint32_t i = 0; bad == NULL && i < e->nclasses; i++) {
        const zclass *c = &e->classes[i];
        if (c->nz > c->zcap || c->nfree_zs > c->nz)
            bad = "a class's zspage arrays overflow their capacity";
    }
    if (bad != NULL) {
        PyErr_SetString(PoolCorruptionError, bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Tests corrupt the state through this (as tests of the Python pool write its arrays):
 * _poke(array, cid, index, value) with array one of "frames", "slots", "inuse", "next",
 * "hloc" (cid ignored), or a counter "pages_used", "bytes_stored" (cid, index ignored), or
 * "push_free_frame" (value pushed on the free-frame stack). */
static PyObject *
Engine_poke(Engine *e, PyObject *args)
{
    const char *name;
    unsigned int cid;
    unsigned long long index, value;
    if (enter(e) < 0 || !PyArg_ParseTuple(args, "sIKK:_poke", &name, &cid, &index, &value))
        return NULL;
    if (cid >= e->nclasses)
        return PyErr_Format(PyExc_IndexError, "no class %u", cid);
    zclass *c = &e->classes[cid];
    int ok = 1;
    if (strcmp(name, "frames") == 0 && index < c->nz * c->pages)
        c->frames[index] = (uint32_t)value;
    else if (strcmp(name, "slots") == 0 && index < c->nz * c->objs)
        c->slots[index] = (uint32_t)value;
    else if (strcmp(name, "inuse") == 0 && index < c->nz)
        c->inuse[index] = (uint16_t)value;
    else if (strcmp(name, "next") == 0 && index < c->nz)
        c->next[index] = (int32_t)value;
    else if (strcmp(name, "hloc") == 0 && index < e->hlen)
        e->hloc[index] = value;
    else if (strcmp(name, "pages_used") == 0)
        e->pages_used = (int64_t)value;
    else if (strcmp(name, "bytes_stored") == 0)
        e->bytes_stored = (int64_t)value;
    else if (strcmp(name, "push_free_frame") == 0 && e->arena.nfree < e->arena.freecap) {
        e->arena.free_frames[e->arena.nfree++] = (uint32_t)value & ~RUN_TAG;
        e->arena.free_count++;
    }
    else
        ok = 0;
    if (!ok)
        return PyErr_Format(PyExc_IndexError, "cannot poke %s[%llu]", name, index);
    Py_RETURN_NONE;
}

/* -- attributes --------------------------------------------------------------------------- */

#define COUNTER(name)                                                                      \
    static PyObject *Engine_get_##name(Engine *e, void *Py_UNUSED(closure))                \
    {                                                                                      \
        return PyLong_FromLongLong(e->name);                                               \
    }
COUNTER(pages_used)
COUNTER(max_pages_used)
COUNTER(objects)
COUNTER(bytes_stored)
COUNTER(huge_objects)
COUNTER(pages_compacted)
COUNTER(objects_moved)
COUNTER(bytes_moved)
COUNTER(mem_limit_pages)
#undef COUNTER

static int
Engine_set_mem_limit_pages(Engine *e, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "mem_limit_pages cannot be deleted");
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "mem_limit_pages must be >= 0 (0 = unlimited)");
        return -1;
    }
    e->mem_limit_pages = v;
    return 0;
}

static PyObject *
Engine_get_huge_class_size(Engine *e, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(e->huge_size);
}

static PyObject *
Engine_get_zspage_count(Engine *e, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(e->zspages + e->huge_objects);
}

static PyObject *
Engine_get_free_frame_count(Engine *e, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(e->arena.free_count);
}

static PyObject *
Engine_get_warm_frame_count(Engine *e, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(e->arena.nwarm);
}

static PyObject *
Engine_get_mapped_bytes(Engine *e, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(e->arena.nseg * SEGMENT_BYTES);
}

static PyGetSetDef Engine_getset[] = {
    {"pages_used", (getter)Engine_get_pages_used, NULL, "frames held by live zspages", NULL},
    {"max_pages_used", (getter)Engine_get_max_pages_used, NULL, "high-water mark", NULL},
    {"objects", (getter)Engine_get_objects, NULL, "live objects", NULL},
    {"bytes_stored", (getter)Engine_get_bytes_stored, NULL, "sum of object sizes", NULL},
    {"huge_objects", (getter)Engine_get_huge_objects, NULL, "live huge objects", NULL},
    {"pages_compacted", (getter)Engine_get_pages_compacted, NULL, "frames compaction freed",
     NULL},
    {"objects_moved", (getter)Engine_get_objects_moved, NULL, "objects compaction moved", NULL},
    {"bytes_moved", (getter)Engine_get_bytes_moved, NULL, "bytes compaction copied", NULL},
    {"mem_limit_pages", (getter)Engine_get_mem_limit_pages,
     (setter)Engine_set_mem_limit_pages, "frames the pool may hold (0 = unlimited)", NULL},
    {"huge_class_size", (getter)Engine_get_huge_class_size, NULL, "the huge watermark", NULL},
    {"zspage_count", (getter)Engine_get_zspage_count, NULL, "live zspages (huge included)",
     NULL},
    {"free_frame_count", (getter)Engine_get_free_frame_count, NULL, "DONTNEED-ed frames", NULL},
    {"warm_frame_count", (getter)Engine_get_warm_frame_count, NULL, "resident freed frames",
     NULL},
    {"mapped_bytes", (getter)Engine_get_mapped_bytes, NULL, "address space reserved", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Engine_methods[] = {
    {"malloc", (PyCFunction)Engine_malloc, METH_O, "allocate an object of size bytes"},
    {"store", (PyCFunction)Engine_store, METH_O, "malloc(len(data)) and write data"},
    {"write", (PyCFunction)Engine_write, METH_VARARGS, "write data at the object's start"},
    {"read", (PyCFunction)Engine_read, METH_O, "the object's bytes"},
    {"read_many", (PyCFunction)Engine_read_many, METH_O, "read() of each handle"},
    {"read_joined", (PyCFunction)Engine_read_joined, METH_O,
     "the objects concatenated and their sizes"},
    {"object_size", (PyCFunction)Engine_object_size, METH_O, "the object's size"},
    {"free", (PyCFunction)Engine_free, METH_O, "free the object; its size"},
    {"store_many", (PyCFunction)Engine_store_many, METH_VARARGS,
     "store the objects laid back to back in blob; the handles of a prefix"},
    {"free_many", (PyCFunction)Engine_free_many, METH_O, "free() each handle; their sizes"},
    {"can_compact", (PyCFunction)(void (*)(void))Engine_can_compact,
     METH_VARARGS | METH_KEYWORDS, "frames compaction could free"},
    {"compact_step", (PyCFunction)(void (*)(void))Engine_compact_step,
     METH_VARARGS | METH_KEYWORDS,
     "move at most max_objects objects; how many moved"},
    {"compact", (PyCFunction)Engine_compact, METH_NOARGS, "compact to completion; frames freed"},
    {"trim", (PyCFunction)Engine_trim, METH_NOARGS, "give the warm frames back to the OS"},
    {"reset_max_pages", (PyCFunction)Engine_reset_max_pages, METH_NOARGS,
     "restart the high-water mark"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "unmap all memory"},
    {"_class_rows", (PyCFunction)Engine_class_rows, METH_NOARGS, "class statistics rows"},
    {"_heap_bytes", (PyCFunction)Engine_heap_bytes, METH_NOARGS, "bytes of C bookkeeping"},
    {"_segment_ranges", (PyCFunction)Engine_segment_ranges, METH_NOARGS,
     "address ranges of the segments"},
    {"_segment_addresses", (PyCFunction)Engine_segment_addresses, METH_NOARGS,
     "start addresses of the segments"},
    {"_export", (PyCFunction)Engine_export, METH_NOARGS, "the whole state, for the checker"},
    {"_table_resident", (PyCFunction)Engine_table_resident, METH_NOARGS,
     "bytes and resident bytes of the handle table and the free-frame stack"},
    {"_check_native", (PyCFunction)Engine_check_native, METH_NOARGS,
     "checks of what the export cannot show"},
    {"_poke", (PyCFunction)Engine_poke, METH_VARARGS, "corrupt one word (tests)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zfs_ram.pool._zsmalloc.Engine",
    .tp_doc = "zsmalloc.py's ZsmallocPool in C (wrapped by zfs_ram.pool.native)",
    .tp_basicsize = sizeof(Engine),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* batch_madvise([enabled]) -> bool: whether freed frames go back with process_madvise()
 * (see dontneed_runs); `False` makes every later flush use madvise() run by run, as on a
 * kernel that refuses it, so that tests see that path too. */
static PyObject *
module_batch_madvise(PyObject *module, PyObject *args)
{
    (void)module;
    int enabled = -1;
    if (!PyArg_ParseTuple(args, "|p:batch_madvise", &enabled))
        return NULL;
    if (enabled >= 0)
        atomic_store_explicit(&batch_madvise_works, enabled, memory_order_relaxed);
    return PyBool_FromLong(atomic_load_explicit(&batch_madvise_works, memory_order_relaxed));
}

static PyMethodDef module_methods[] = {
    {"batch_madvise", module_batch_madvise, METH_VARARGS,
     "whether freed frames are given back with process_madvise(); an argument sets it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef zsmalloc_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "zfs_ram.pool._zsmalloc",
    .m_doc = "The compiled zsmalloc engine (see zfs_ram/pool/_zsmalloc.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

static PyObject *
get_attr(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return NULL;
    PyObject *a = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return a;
}

PyMODINIT_FUNC
PyInit__zsmalloc(void)
{
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    if (PoolFullError == NULL) {
        PoolFullError = get_attr("zfs_ram.pool.errors", "PoolFullError");
        InvalidSizeError = get_attr("zfs_ram.pool.errors", "InvalidSizeError");
        InvalidHandleError = get_attr("zfs_ram.pool.errors", "InvalidHandleError");
        PoolCorruptionError = get_attr("zfs_ram.pool.errors", "PoolCorruptionError");
        ArrayType = get_attr("array", "array");
        if (!PoolFullError || !InvalidSizeError || !InvalidHandleError ||
            !PoolCorruptionError || !ArrayType) {
            Py_CLEAR(PoolFullError);
            Py_CLEAR(InvalidSizeError);
            Py_CLEAR(InvalidHandleError);
            Py_CLEAR(PoolCorruptionError);
            Py_CLEAR(ArrayType);
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&zsmalloc_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", PAGE_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SEGMENT_SHIFT", SEGMENT_SHIFT) < 0 ||
        PyModule_AddIntConstant(m, "WARM_FRAMES", WARM_FRAMES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HANDLE", (long)MAX_HANDLE) < 0 ||
        PyModule_AddIntConstant(m, "NR_GROUPS", NR_GROUPS) < 0 ||
        PyModule_AddIntConstant(m, "POUR_SLACK_PERCENT", POUR_SLACK_PERCENT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
