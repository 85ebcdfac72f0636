/* zfs_ram._codec: the page codec's loops over a batch of pages, in C, without the GIL.
 *
 * The compiled twin of zfs_ram/codec.py, which keeps the pure-Python reference and decides
 * which engine runs. Policy stays there; this file only loops over pages:
 *
 *   encode(algorithm, level, src, huge_size, sizes, words) -> bytes
 *       src holds n whole pages back to back. For each page, as zram's zram_write_page does:
 *       the same-filled check (every 8-byte word equal, the last word compared first), else
 *       the compressor, else (output not below huge_size) the page kept raw. Returns the
 *       objects back to back, shaped for Pool.store_many; sizes (array('H'), n entries) gets
 *       each page's object size, 0 for a same-filled page, whose word goes to words
 *       (array('Q'), n entries; 0 for every other page).
 *   encode_page(algorithm, level, page, huge_size) -> bytes | int
 *       One page: its object, or its word if it is same-filled (the one-page write's path).
 *   decode_into(algorithm, blob, sizes, words, out, skip[, secondary, priorities])
 *       The inverse, straight into the writable buffer out: the pages encode described,
 *       starting `skip` bytes into the first one, as many bytes as out holds. An object of
 *       PAGE_SIZE bytes is a raw page, shorter ones are compressed, size 0 is filled with
 *       its word (a hole is the word 0).
 *   decode(algorithm, blob, sizes, words, skip, length[, secondary, priorities]) -> bytes
 *       decode_into a new bytes object of `length` bytes: a FUSE read's reply. A page whose
 *       byte in priorities (one per page) is not 0 was recompressed: it decodes with
 *       `secondary` (zram's recomp_algorithm) instead.
 *
 * Invariants. The GIL is released for the whole batch and never taken inside it: the loops
 * touch only buffers exported (and so pinned) before it is released, and the bytes object
 * being filled, which nobody else holds yet. Every length is checked before the loop; a
 * corrupt object (lz4 failing or not giving exactly PAGE_SIZE bytes) stops the loop and
 * raises CorruptError naming it; nothing is written past any buffer.
 *
 * The page store's table loops (place, handles_of, spread) live here too: the per-page part
 * of its batches, over its array('Q') chunks, the accounting left to zfs_ram/pagestore.py.
 *
 * Algorithms are numbered (ALGORITHM_LZ4, ALGORITHM_LZ4HC, ALGORITHM_ZSTD) and switched on in
 * compress_page and decompress_page only; each is one case there and one name in codec.py. The
 * level is the algorithm's own: lz4's acceleration, lz4hc's and zstd's compression level.
 * zstd keeps one compression and one decompression context per thread (_Thread_local, made on
 * first use and kept for the thread's life): a batch runs on the caller's thread or the codec's
 * helper thread, never on two at once with the same context.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <lz4.h>
#include <lz4hc.h>
#include <stdint.h>
#include <zstd.h>
#include <string.h>

#define PAGE_SIZE 4096
#define WORDS_PER_PAGE (PAGE_SIZE / 8)

enum algorithm { ALGORITHM_LZ4 = 0, ALGORITHM_LZ4HC = 1, ALGORITHM_ZSTD = 2, ALGORITHM_COUNT };

/* The most any compressor may write for one page: lz4's and zstd's worst cases. */
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define COMPRESS_BOUND MAX2(LZ4_COMPRESSBOUND(PAGE_SIZE), ZSTD_COMPRESSBOUND(PAGE_SIZE))

static PyObject *CorruptError; /* zfs_ram._codec.CorruptError, a ValueError */

/* -- one page ---------------------------------------------------------------------------- */

static inline uint64_t load_word(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, sizeof word); /* any alignment: a memoryview slice may be unaligned */
    return word;
}

/* zram's page_same_filled: 1 and the word if every 8-byte word of the page is the first. The
 * last word is compared first, as the kernel does: most pages differ there. */
static int same_filled(const unsigned char *page, uint64_t *word)
{
    uint64_t first = load_word(page);
    if (load_word(page + PAGE_SIZE - 8) != first)
        return 0;
    for (size_t i = 1; i < WORDS_PER_PAGE - 1; i++)
        if (load_word(page + 8 * i) != first)
            return 0;
    *word = first;
    return 1;
}

static _Thread_local ZSTD_CCtx *zstd_cctx; /* this thread's, made on first use */
static _Thread_local ZSTD_DCtx *zstd_dctx;

/* Compress one page into dst (capacity COMPRESS_BOUND at least): the output's length, or 0
 * if the compressor failed. Capacity is never the limit that makes a compressor stop: with a
 * limited output lz4 gives up early on pages whose output would still fit, and the raw/huge
 * choice must be made on the same length the pure-Python engine gives. zstd writes a whole
 * frame (content size, no checksum), as the kernel's zstd backend for zram does. */
static int compress_page(int algorithm, int level, const unsigned char *page, unsigned char *dst)
{
    switch (algorithm) {
    case ALGORITHM_LZ4:
        return LZ4_compress_fast((const char *)page, (char *)dst, PAGE_SIZE, COMPRESS_BOUND,
                                 level);
    case ALGORITHM_LZ4HC:
        return LZ4_compress_HC((const char *)page, (char *)dst, PAGE_SIZE, COMPRESS_BOUND, level);
    case ALGORITHM_ZSTD: {
        if (zstd_cctx == NULL && (zstd_cctx = ZSTD_createCCtx()) == NULL)
            return 0;
        size_t size = ZSTD_compressCCtx(zstd_cctx, dst, COMPRESS_BOUND, page, PAGE_SIZE, level);
        return ZSTD_isError(size) ? 0 : (int)size;
    }
    default:
        return 0;
    }
}

/* Decompress one object into a page: 0 on success, -1 if it is corrupt. */
static int decompress_page(int algorithm, const unsigned char *src, size_t size,
                           unsigned char *page)
{
    switch (algorithm) {
    case ALGORITHM_LZ4:
    case ALGORITHM_LZ4HC: /* the same block format */
        return LZ4_decompress_safe((const char *)src, (char *)page, (int)size, PAGE_SIZE) ==
                       PAGE_SIZE
                   ? 0
                   : -1;
    case ALGORITHM_ZSTD: {
        if (zstd_dctx == NULL && (zstd_dctx = ZSTD_createDCtx()) == NULL)
            return -1;
        size_t got = ZSTD_decompressDCtx(zstd_dctx, page, PAGE_SIZE, src, size);
        return !ZSTD_isError(got) && got == PAGE_SIZE ? 0 : -1;
    }
    default:
        return -1;
    }
}

static int check_algorithm(int algorithm)
{
    if (algorithm < 0 || algorithm >= ALGORITHM_COUNT) {
        PyErr_Format(PyExc_ValueError, "unknown algorithm %d", algorithm);
        return -1;
    }
    return 0;
}

/* A writable or readable buffer holding exactly `count` items of `itemsize` bytes. */
static int check_items(const Py_buffer *buffer, Py_ssize_t count, Py_ssize_t itemsize,
                       const char *name)
{
    if (buffer->len != count * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, not %zd (%zd items of %zd)", name,
                     buffer->len, count * itemsize, count, itemsize);
        return -1;
    }
    return 0;
}

/* -- encode ------------------------------------------------------------------------------ */

/* Room for a batch's output: the objects take at most PAGE_SIZE each (a page that does not
 * compress below huge_size <= PAGE_SIZE is kept raw), plus room for the compressor to write
 * its worst case past the last one before the raw choice overwrites it. */
#define ENCODE_SLACK (COMPRESS_BOUND - PAGE_SIZE)

static PyObject *codec_encode(PyObject *module, PyObject *args)
{
    (void)module;
    int algorithm, level;
    Py_ssize_t huge_size;
    Py_buffer src = {0}, sizes = {0}, words = {0};
    PyObject *blob = NULL;
    if (!PyArg_ParseTuple(args, "iiy*nw*w*:encode", &algorithm, &level, &src, &huge_size,
                          &sizes, &words))
        return NULL;
    if (check_algorithm(algorithm) < 0)
        goto done;
    if (huge_size < 1 || huge_size > PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "huge_size %zd is not in 1..%d", huge_size, PAGE_SIZE);
        goto done;
    }
    if (src.len % PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole pages", src.len);
        goto done;
    }
    Py_ssize_t count = src.len / PAGE_SIZE;
    if (check_items(&sizes, count, sizeof(uint16_t), "sizes") < 0 ||
        check_items(&words, count, sizeof(uint64_t), "words") < 0)
        goto done;
    if (count > (PY_SSIZE_T_MAX - ENCODE_SLACK) / PAGE_SIZE) {
        PyErr_NoMemory();
        goto done;
    }
    blob = PyBytes_FromStringAndSize(NULL, count * PAGE_SIZE + ENCODE_SLACK);
    if (blob == NULL)
        goto done;

    const unsigned char *in = src.buf;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(blob);
    unsigned char *size_out = sizes.buf, *word_out = words.buf;
    Py_ssize_t length = 0;
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *page = in + (size_t)i * PAGE_SIZE;
        uint64_t word = 0;
        uint16_t size;
        if (same_filled(page, &word)) {
            size = 0;
        } else {
            /* length <= i * PAGE_SIZE, so the compressor's worst case fits in what is left. */
            int packed = compress_page(algorithm, level, page, out + length);
            if (packed <= 0) {
                failed = i;
                break;
            }
            if (packed >= huge_size) {
                memcpy(out + length, page, PAGE_SIZE);
                size = PAGE_SIZE;
            } else {
                size = (uint16_t)packed;
            }
            length += size;
        }
        memcpy(size_out + sizeof size * (size_t)i, &size, sizeof size);
        memcpy(word_out + sizeof word * (size_t)i, &word, sizeof word);
    }
    Py_END_ALLOW_THREADS
    if (failed >= 0) {
        PyErr_Format(PyExc_RuntimeError, "the compressor failed on page %zd", failed);
        Py_CLEAR(blob);
        goto done;
    }
    if (_PyBytes_Resize(&blob, length) < 0) /* frees blob and sets it to NULL on failure */
        goto done;
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&words);
    return blob;
}

/* encode_page(algorithm, level, page, huge_size) -> bytes | int: one page as encode() would
 * encode it, for the page store's one-page writes: the object to store, or the same-filled
 * page's word as an int. No arrays to make, for the commonest small write. */
static PyObject *codec_encode_page(PyObject *module, PyObject *args)
{
    (void)module;
    int algorithm, level;
    Py_ssize_t huge_size;
    Py_buffer page = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "iiy*n:encode_page", &algorithm, &level, &page, &huge_size))
        return NULL;
    if (check_algorithm(algorithm) < 0)
        goto done;
    if (huge_size < 1 || huge_size > PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "huge_size %zd is not in 1..%d", huge_size, PAGE_SIZE);
        goto done;
    }
    if (page.len != PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not one page", page.len);
        goto done;
    }
    unsigned char packed[COMPRESS_BOUND];
    uint64_t word = 0;
    int same, size = 0;
    Py_BEGIN_ALLOW_THREADS
    same = same_filled(page.buf, &word);
    if (!same)
        size = compress_page(algorithm, level, page.buf, packed);
    Py_END_ALLOW_THREADS
    if (same)
        result = PyLong_FromUnsignedLongLong(word);
    else if (size <= 0)
        PyErr_SetString(PyExc_RuntimeError, "the compressor failed");
    else if (size >= huge_size)
        result = PyBytes_FromStringAndSize(page.buf, PAGE_SIZE);
    else
        result = PyBytes_FromStringAndSize((const char *)packed, size);
done:
    PyBuffer_Release(&page);
    return result;
}

/* -- decode ------------------------------------------------------------------------------ */

/* Check a decode's arguments (with the GIL): -1 and an exception if they do not fit. */
static int check_decode(int algorithm, const Py_buffer *blob, const Py_buffer *sizes,
                        const Py_buffer *words, Py_ssize_t skip, Py_ssize_t length)
{
    if (check_algorithm(algorithm) < 0)
        return -1;
    if (sizes->len % sizeof(uint16_t)) {
        PyErr_SetString(PyExc_ValueError, "sizes is not a whole number of 16-bit items");
        return -1;
    }
    Py_ssize_t count = sizes->len / (Py_ssize_t)sizeof(uint16_t);
    if (check_items(words, count, sizeof(uint64_t), "words") < 0)
        return -1;
    if (skip < 0 || skip >= PAGE_SIZE || length < 0 || length > count * PAGE_SIZE - skip) {
        PyErr_Format(PyExc_ValueError,
                     "%zd bytes from byte %zd do not lie within %zd pages", length, skip, count);
        return -1;
    }
    /* The objects must fill the blob exactly: then none reaches past it. */
    const unsigned char *size_in = sizes->buf;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t size;
        memcpy(&size, size_in + sizeof size * (size_t)i, sizeof size);
        if (size > PAGE_SIZE) {
            PyErr_Format(CorruptError, "object %zd: %u bytes, more than a page", i,
                         (unsigned)size);
            return -1;
        }
        total += size;
    }
    if (total != blob->len) {
        PyErr_Format(CorruptError, "the objects' sizes add up to %zd bytes, the blob has %zd",
                     total, blob->len);
        return -1;
    }
    return 0;
}

/* Fill `length` bytes at out with the pages described, from byte `skip` of the first one.
 * Returns -1 if all went well, else the index of the first corrupt object. No GIL needed. */
static Py_ssize_t decode_pages(int algorithm, int secondary, const unsigned char *priorities,
                               const unsigned char *in, const unsigned char *size_in,
                               const unsigned char *word_in, Py_ssize_t skip,
                               unsigned char *out, Py_ssize_t length)
{
    unsigned char scratch[PAGE_SIZE]; /* a page only partly wanted is decoded here first */
    Py_ssize_t position = -skip;      /* where page i starts, relative to out */
    for (Py_ssize_t i = 0; position < length; i++, position += PAGE_SIZE) {
        uint16_t size;
        uint64_t word;
        memcpy(&size, size_in + sizeof size * (size_t)i, sizeof size);
        memcpy(&word, word_in + sizeof word * (size_t)i, sizeof word);
        int whole = position >= 0 && position + PAGE_SIZE <= length;
        unsigned char *page = whole ? out + position : scratch;
        if (size == 0) {
            if (word == 0) {
                memset(page, 0, PAGE_SIZE);
            } else {
                for (size_t w = 0; w < WORDS_PER_PAGE; w++)
                    memcpy(page + 8 * w, &word, sizeof word);
            }
        } else if (size == PAGE_SIZE) {
            if (whole) {
                memcpy(page, in, PAGE_SIZE);
            } else {
                page = (unsigned char *)in; /* raw: copied below straight from the blob */
            }
        } else if (decompress_page(priorities != NULL && priorities[i] ? secondary : algorithm,
                                   in, size, page) < 0) {
            return i;
        }
        in += size;
        if (!whole) {
            Py_ssize_t from = position < 0 ? -position : 0;
            Py_ssize_t upto = length - position < PAGE_SIZE ? length - position : PAGE_SIZE;
            memcpy(out + position + from, page + from, (size_t)(upto - from));
        }
    }
    return -1;
}

/* The optional per-page priorities of a decode: each page's byte says which algorithm encoded
 * it (0: `algorithm`, else `secondary`, zram's recompression priority). */
static int check_priorities(const Py_buffer *priorities, int secondary, const Py_buffer *sizes)
{
    if (priorities->buf == NULL)
        return 0;
    if (check_algorithm(secondary) < 0)
        return -1;
    return check_items(priorities, sizes->len / (Py_ssize_t)sizeof(uint16_t), 1, "priorities");
}

static PyObject *corrupt(Py_ssize_t index)
{
    PyErr_Format(CorruptError, "object %zd is corrupt: it does not decompress to one page",
                 index);
    return NULL;
}

static PyObject *codec_decode_into(PyObject *module, PyObject *args)
{
    (void)module;
    int algorithm, secondary = -1;
    Py_ssize_t skip = 0;
    Py_buffer blob = {0}, sizes = {0}, words = {0}, out = {0}, priorities = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*w*|niy*:decode_into", &algorithm, &blob, &sizes, &words,
                          &out, &skip, &secondary, &priorities))
        return NULL;
    if (check_decode(algorithm, &blob, &sizes, &words, skip, out.len) < 0 ||
        check_priorities(&priorities, secondary, &sizes) < 0)
        goto done;
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_pages(algorithm, secondary, priorities.buf, blob.buf, sizes.buf, words.buf,
                          skip, out.buf, out.len);
    Py_END_ALLOW_THREADS
    if (failed >= 0)
        corrupt(failed);
    else
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&blob);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&words);
    PyBuffer_Release(&out);
    PyBuffer_Release(&priorities);
    return result;
}

static PyObject *codec_decode(PyObject *module, PyObject *args)
{
    (void)module;
    int algorithm, secondary = -1;
    Py_ssize_t skip, length;
    Py_buffer blob = {0}, sizes = {0}, words = {0}, priorities = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*nn|iy*:decode", &algorithm, &blob, &sizes, &words, &skip,
                          &length, &secondary, &priorities))
        return NULL;
    if (check_decode(algorithm, &blob, &sizes, &words, skip, length) < 0 ||
        check_priorities(&priorities, secondary, &sizes) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(NULL, length);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_pages(algorithm, secondary, priorities.buf, blob.buf, sizes.buf, words.buf,
                          skip, out, length);
    Py_END_ALLOW_THREADS
    if (failed >= 0) {
        Py_CLEAR(result);
        corrupt(failed);
    }
done:
    PyBuffer_Release(&blob);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&words);
    PyBuffer_Release(&priorities);
    return result;
}

/* -- the page store's table ------------------------------------------------------------- */

/* The page store's entries (zfs_ram/pagetable.py has the layout and the pure-Python twins of
 * these loops; the page store keeps all the accounting): 0 a hole, SAME_ENTRY a same-filled
 * page, and an object entry (bit 0 set) holds, from the bottom: its handle (32 bits), its
 * access stamp (27 bits, 0: idle), TRIED (recompression did not shrink it), its priority (2
 * bits: which algorithm encoded it) and HUGE (a raw page). */
#define SAME_ENTRY 2
#define HANDLE_MASK ((UINT64_C(1) << 32) - 1)
#define STAMP_SHIFT 33
#define STAMP_MAX ((UINT64_C(1) << 27) - 1)
#define STAMP_FIELD (STAMP_MAX << STAMP_SHIFT)
#define PRIORITY_SHIFT 61
#define HUGE_BIT (UINT64_C(1) << 63)

static inline uint64_t handle_of(uint64_t entry)
{
    return entry >> 1 & HANDLE_MASK;
}

static inline uint64_t load_u64(const unsigned char *base, Py_ssize_t i)
{
    uint64_t value;
    memcpy(&value, base + sizeof value * (size_t)i, sizeof value);
    return value;
}

static inline void store_u64(unsigned char *base, Py_ssize_t i, uint64_t value)
{
    memcpy(base + sizeof value * (size_t)i, &value, sizeof value);
}

static inline uint16_t load_u16(const unsigned char *base, Py_ssize_t i)
{
    uint16_t value;
    memcpy(&value, base + sizeof value * (size_t)i, sizeof value);
    return value;
}

static int check_range(const Py_buffer *buffer, Py_ssize_t itemsize, Py_ssize_t first,
                       Py_ssize_t count, const char *name)
{
    if (buffer->len % itemsize || first < 0 || count < 0 ||
        first > buffer->len / itemsize - count) {
        PyErr_Format(PyExc_ValueError, "%s: items %zd..%zd+%zd are not within its %zd bytes",
                     name, first, first, count, buffer->len);
        return -1;
    }
    return 0;
}

/* place(chunk, start, sizes, first, count, handles, hfirst, olds, ofirst, stamp)
 *     -> (new_pages, old_same, old_objects, handles_used)
 * Entries chunk[start:start+count] become the pages sizes[first:first+count] describe: an
 * object (the next handle from handles[hfirst:], accessed at `stamp`, HUGE if PAGE_SIZE bytes)
 * or SAME_ENTRY (size 0). The old entries' handles go to olds[ofirst:], to be freed; holes and
 * same-filled pages replaced are counted. */
static PyObject *codec_place(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer chunk = {0}, sizes = {0}, handles = {0}, olds = {0};
    Py_ssize_t start, first, count, hfirst, ofirst;
    unsigned long long stamp;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*ny*nny*nw*nK:place", &chunk, &start, &sizes, &first, &count,
                          &handles, &hfirst, &olds, &ofirst, &stamp))
        return NULL;
    if (stamp > STAMP_MAX) {
        PyErr_Format(PyExc_ValueError, "place: stamp %llu is past %llu", stamp,
                     (unsigned long long)STAMP_MAX);
        goto done;
    }
    if (check_range(&chunk, 8, start, count, "chunk") < 0 ||
        check_range(&sizes, 2, first, count, "sizes") < 0 ||
        check_range(&handles, 8, hfirst, 0, "handles") < 0 ||
        check_range(&olds, 8, ofirst, count, "olds") < 0)
        goto done;
    Py_ssize_t new_pages = 0, old_same = 0, old_objects = 0, used = 0;
    Py_ssize_t handles_left = handles.len / 8 - hfirst;
    int short_of_handles = 0, wide = 0;
    unsigned char *table = chunk.buf, *old_out = olds.buf;
    const unsigned char *size_in = sizes.buf, *handle_in = handles.buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t objects = 0;
    for (Py_ssize_t i = 0; i < count; i++)
        objects += load_u16(size_in, first + i) != 0;
    short_of_handles = objects > handles_left; /* then nothing is changed */
    for (Py_ssize_t i = 0; i < objects && !short_of_handles; i++)
        wide |= load_u64(handle_in, hfirst + i) > HANDLE_MASK;
    for (Py_ssize_t i = 0; i < count && !short_of_handles && !wide; i++) {
        uint64_t entry = SAME_ENTRY;
        uint16_t size = load_u16(size_in, first + i);
        if (size)
            entry = load_u64(handle_in, hfirst + used++) << 1 | 1 |
                    (uint64_t)stamp << STAMP_SHIFT | (size == PAGE_SIZE ? HUGE_BIT : 0);
        uint64_t old = load_u64(table, start + i);
        store_u64(table, start + i, entry);
        if (old & 1)
            store_u64(old_out, ofirst + old_objects++, handle_of(old));
        else if (old)
            old_same++;
        else
            new_pages++;
    }
    Py_END_ALLOW_THREADS
    if (short_of_handles)
        PyErr_SetString(PyExc_ValueError, "place: fewer handles than objects");
    else if (wide)
        PyErr_SetString(PyExc_ValueError, "place: a handle does not fit in 32 bits");
    else
        result = Py_BuildValue("nnnn", new_pages, old_same, old_objects, used);
done:
    PyBuffer_Release(&chunk);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&handles);
    PyBuffer_Release(&olds);
    return result;
}

/* handles_of(entries, out) -> n: the handles of the object entries, in order, into out[:n]. */
static PyObject *codec_handles_of(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer entries = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*w*:handles_of", &entries, &out))
        return NULL;
    if (check_range(&entries, 8, 0, entries.len / 8, "entries") < 0 ||
        check_range(&out, 8, 0, entries.len / 8, "out") < 0)
        goto done;
    Py_ssize_t count = entries.len / 8, found = 0;
    const unsigned char *in = entries.buf;
    unsigned char *handle_out = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t entry = load_u64(in, i);
        if (entry & 1)
            store_u64(handle_out, found++, handle_of(entry));
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    PyBuffer_Release(&entries);
    PyBuffer_Release(&out);
    return result;
}

/* spread(entries, object_sizes, out): out[i] = the next object's size for an object entry,
 * else 0: the per-page sizes decode() takes, from the per-object sizes Pool.read_joined gives. */
static PyObject *codec_spread(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer entries = {0}, object_sizes = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*w*:spread", &entries, &object_sizes, &out))
        return NULL;
    if (check_range(&entries, 8, 0, entries.len / 8, "entries") < 0 ||
        check_range(&object_sizes, 2, 0, object_sizes.len / 2, "object_sizes") < 0 ||
        check_range(&out, 2, 0, entries.len / 8, "out") < 0 || out.len / 2 != entries.len / 8)
        goto fail;
    Py_ssize_t count = entries.len / 8, objects = object_sizes.len / 2, used = 0;
    const unsigned char *in = entries.buf, *size_in = object_sizes.buf;
    unsigned char *size_out = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t size = 0;
        if (load_u64(in, i) & 1 && used < objects)
            size = load_u16(size_in, used++);
        else if (load_u64(in, i) & 1)
            used++; /* one object too few: reported below */
        memcpy(size_out + sizeof size * (size_t)i, &size, sizeof size);
    }
    Py_END_ALLOW_THREADS
    if (used != objects) {
        PyErr_Format(PyExc_ValueError, "spread: %zd object entries, %zd object sizes", used,
                     objects);
        goto fail;
    }
    result = Py_NewRef(Py_None);
fail:
    PyBuffer_Release(&entries);
    PyBuffer_Release(&object_sizes);
    PyBuffer_Release(&out);
    return result;
}

/* touch(chunk, start, count, stamp): the object entries of chunk[start:start+count] were
 * accessed at `stamp` (a read or a write clears idle, as zram's). */
static PyObject *codec_touch(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer chunk = {0};
    Py_ssize_t start, count;
    unsigned long long stamp;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*nnK:touch", &chunk, &start, &count, &stamp))
        return NULL;
    if (check_range(&chunk, 8, start, count, "chunk") < 0)
        goto done;
    if (stamp > STAMP_MAX) {
        PyErr_Format(PyExc_ValueError, "touch: stamp %llu is past %llu", stamp,
                     (unsigned long long)STAMP_MAX);
        goto done;
    }
    unsigned char *table = chunk.buf;
    for (Py_ssize_t i = start; i < start + count; i++) {
        uint64_t entry = load_u64(table, i);
        if (entry & 1)
            store_u64(table, i, (entry & ~STAMP_FIELD) | (uint64_t)stamp << STAMP_SHIFT);
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&chunk);
    return result;
}

/* mark_idle(chunk, cutoff) -> n: object entries last accessed at or before `cutoff` (and not
 * idle yet) become idle (stamp 0); returns how many did. */
static PyObject *codec_mark_idle(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer chunk = {0};
    unsigned long long cutoff;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*K:mark_idle", &chunk, &cutoff))
        return NULL;
    if (check_range(&chunk, 8, 0, chunk.len / 8, "chunk") < 0)
        goto done;
    unsigned char *table = chunk.buf;
    Py_ssize_t marked = 0;
    for (Py_ssize_t i = 0; i < chunk.len / 8; i++) {
        uint64_t entry = load_u64(table, i);
        uint64_t stamp = (entry & STAMP_FIELD) >> STAMP_SHIFT;
        if (entry & 1 && stamp && stamp <= cutoff) {
            store_u64(table, i, entry & ~STAMP_FIELD);
            marked++;
        }
    }
    result = PyLong_FromSsize_t(marked);
done:
    PyBuffer_Release(&chunk);
    return result;
}

/* priorities_of(entries, out) -> n: out[i] = entry i's priority (0 for holes and same-filled
 * pages), the per-page bytes decode() takes; returns how many are not 0. */
static PyObject *codec_priorities_of(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer entries = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*w*:priorities_of", &entries, &out))
        return NULL;
    if (check_range(&entries, 8, 0, entries.len / 8, "entries") < 0 ||
        check_items(&out, entries.len / 8, 1, "out") < 0)
        goto done;
    const unsigned char *in = entries.buf;
    unsigned char *priority_out = out.buf;
    Py_ssize_t found = 0;
    for (Py_ssize_t i = 0; i < entries.len / 8; i++) {
        uint64_t entry = load_u64(in, i);
        unsigned char priority = entry & 1 ? (unsigned char)(entry >> PRIORITY_SHIFT & 3) : 0;
        priority_out[i] = priority;
        found += priority != 0;
    }
    result = PyLong_FromSsize_t(found);
done:
    PyBuffer_Release(&entries);
    PyBuffer_Release(&out);
    return result;
}

/* -- the module -------------------------------------------------------------------------- */

static PyMethodDef codec_methods[] = {
    {"encode", codec_encode, METH_VARARGS,
     "encode(algorithm, level, src, huge_size, sizes, words) -> bytes: a batch of whole pages "
     "as objects back to back; sizes[i] each (0: same-filled, its word in words[i])."},
    {"encode_page", codec_encode_page, METH_VARARGS,
     "encode_page(algorithm, level, page, huge_size) -> bytes | int: one page's object, or "
     "its word if it is same-filled."},
    {"decode_into", codec_decode_into, METH_VARARGS,
     "decode_into(algorithm, blob, sizes, words, out, skip=0, secondary=-1, priorities=None): "
     "the pages encode() described, from byte skip of the first, into the writable buffer out "
     "(as many bytes as it holds); a page whose priorities byte is set decodes with secondary."},
    {"decode", codec_decode, METH_VARARGS,
     "decode(algorithm, blob, sizes, words, skip, length, secondary=-1, priorities=None) -> "
     "bytes: decode_into a new bytes object of length bytes."},
    {"place", codec_place, METH_VARARGS,
     "place(chunk, start, sizes, first, count, handles, hfirst, olds, ofirst, stamp) -> "
     "(new_pages, old_same, old_objects, handles_used): a batch's entries into a chunk."},
    {"touch", codec_touch, METH_VARARGS,
     "touch(chunk, start, count, stamp): the object entries of a range were accessed."},
    {"priorities_of", codec_priorities_of, METH_VARARGS,
     "priorities_of(entries, out) -> n: each entry's priority byte into out; n not 0."},
    {"mark_idle", codec_mark_idle, METH_VARARGS,
     "mark_idle(chunk, cutoff) -> n: object entries accessed at or before cutoff become idle."},
    {"handles_of", codec_handles_of, METH_VARARGS,
     "handles_of(entries, out) -> n: the object entries' handles, in order, into out[:n]."},
    {"spread", codec_spread, METH_VARARGS,
     "spread(entries, object_sizes, out): per-page sizes (0 where no object) into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "zfs_ram._codec",
    .m_doc = "The page codec's batch loops (see zfs_ram/codec.py), without the GIL.",
    .m_size = -1,
    .m_methods = codec_methods,
};

PyMODINIT_FUNC PyInit__codec(void)
{
    PyObject *module = PyModule_Create(&codec_module);
    if (module == NULL)
        return NULL;
    if (CorruptError == NULL) {
        CorruptError = PyErr_NewExceptionWithDoc("zfs_ram._codec.CorruptError",
                                                 "A stored object does not decode to one page.",
                                                 PyExc_ValueError, NULL);
        if (CorruptError == NULL)
            goto fail;
    }
    if (PyModule_AddObjectRef(module, "CorruptError", CorruptError) < 0 ||
        PyModule_AddIntConstant(module, "PAGE_SIZE", PAGE_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "ALGORITHM_LZ4", ALGORITHM_LZ4) < 0 ||
        PyModule_AddIntConstant(module, "ALGORITHM_LZ4HC", ALGORITHM_LZ4HC) < 0 ||
        PyModule_AddIntConstant(module, "ALGORITHM_ZSTD", ALGORITHM_ZSTD) < 0 ||
        PyModule_AddIntConstant(module, "LZ4_VERSION", LZ4_versionNumber()) < 0 ||
        PyModule_AddIntConstant(module, "ZSTD_VERSION", (long)ZSTD_versionNumber()) < 0)
        goto fail;
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}
