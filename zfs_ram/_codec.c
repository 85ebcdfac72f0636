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
 *   decode_into(algorithm, blob, sizes, words, out, skip)
 *       The inverse, straight into the writable buffer out: the pages encode described,
 *       starting `skip` bytes into the first one, as many bytes as out holds. An object of
 *       PAGE_SIZE bytes is a raw page, shorter ones are compressed, size 0 is filled with
 *       its word (a hole is the word 0).
 *   decode(algorithm, blob, sizes, words, skip, length) -> bytes
 *       decode_into a new bytes object of `length` bytes: a FUSE read's reply.
 *
 * Invariants. The GIL is released for the whole batch and never taken inside it: the loops
 * touch only buffers exported (and so pinned) before it is released, and the bytes object
 * being filled, which nobody else holds yet. Every length is checked before the loop; a
 * corrupt object (lz4 failing or not giving exactly PAGE_SIZE bytes) stops the loop and
 * raises CorruptError naming it; nothing is written past any buffer.
 *
 * Algorithms are numbered (ALGORITHM_LZ4, ...) and switched on in compress_page and
 * decompress_page only, so that lz4hc or zstd is one case there and one name in codec.py.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <lz4.h>
#include <stdint.h>
#include <string.h>

#define PAGE_SIZE 4096
#define WORDS_PER_PAGE (PAGE_SIZE / 8)

enum algorithm { ALGORITHM_LZ4 = 0, ALGORITHM_COUNT };

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

/* Compress one page into dst (capacity LZ4_COMPRESSBOUND(PAGE_SIZE) at least): the output's
 * length, or 0 if the compressor failed. Capacity is never the limit that makes lz4 stop:
 * with a limited output lz4 gives up early on pages whose output would still fit, and the
 * raw/huge choice must be made on the same length python-lz4 gives. */
static int compress_page(int algorithm, int level, const unsigned char *page, unsigned char *dst)
{
    switch (algorithm) {
    case ALGORITHM_LZ4:
        return LZ4_compress_fast((const char *)page, (char *)dst, PAGE_SIZE,
                                 LZ4_COMPRESSBOUND(PAGE_SIZE), level);
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
        return LZ4_decompress_safe((const char *)src, (char *)page, (int)size, PAGE_SIZE) ==
                       PAGE_SIZE
                   ? 0
                   : -1;
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
#define ENCODE_SLACK (LZ4_COMPRESSBOUND(PAGE_SIZE) - PAGE_SIZE)

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
static Py_ssize_t decode_pages(int algorithm, const unsigned char *in, const unsigned char *size_in,
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
        } else if (decompress_page(algorithm, in, size, page) < 0) {
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

static PyObject *corrupt(Py_ssize_t index)
{
    PyErr_Format(CorruptError, "object %zd is corrupt: it does not decompress to one page",
                 index);
    return NULL;
}

static PyObject *codec_decode_into(PyObject *module, PyObject *args)
{
    (void)module;
    int algorithm;
    Py_ssize_t skip = 0;
    Py_buffer blob = {0}, sizes = {0}, words = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*w*|n:decode_into", &algorithm, &blob, &sizes, &words,
                          &out, &skip))
        return NULL;
    if (check_decode(algorithm, &blob, &sizes, &words, skip, out.len) < 0)
        goto done;
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_pages(algorithm, blob.buf, sizes.buf, words.buf, skip, out.buf, out.len);
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
    return result;
}

static PyObject *codec_decode(PyObject *module, PyObject *args)
{
    (void)module;
    int algorithm;
    Py_ssize_t skip, length;
    Py_buffer blob = {0}, sizes = {0}, words = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*nn:decode", &algorithm, &blob, &sizes, &words, &skip,
                          &length))
        return NULL;
    if (check_decode(algorithm, &blob, &sizes, &words, skip, length) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(NULL, length);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_pages(algorithm, blob.buf, sizes.buf, words.buf, skip, out, length);
    Py_END_ALLOW_THREADS
    if (failed >= 0) {
        Py_CLEAR(result);
        corrupt(failed);
    }
done:
    PyBuffer_Release(&blob);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&words);
    return result;
}

/* -- the module -------------------------------------------------------------------------- */

static PyMethodDef codec_methods[] = {
    {"encode", codec_encode, METH_VARARGS,
     "encode(algorithm, level, src, huge_size, sizes, words) -> bytes: a batch of whole pages "
     "as objects back to back; sizes[i] each (0: same-filled, its word in words[i])."},
    {"decode_into", codec_decode_into, METH_VARARGS,
     "decode_into(algorithm, blob, sizes, words, out, skip=0): the pages encode() described, "
     "from byte skip of the first, into the writable buffer out (as many bytes as it holds)."},
    {"decode", codec_decode, METH_VARARGS,
     "decode(algorithm, blob, sizes, words, skip, length) -> bytes: decode_into a new bytes "
     "object of length bytes."},
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
        PyModule_AddIntConstant(module, "LZ4_VERSION", LZ4_versionNumber()) < 0)
        goto fail;
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}
