"""One 4 KiB file page <-> the bytes the pool keeps for it, a batch of pages at a time.

Three encodings, chosen per page as zram chooses them:
- same-filled: every 8-byte word of the page is equal (zero pages above all); nothing is stored,
  the word is kept in the page table (zram's same_pages);
- compressed: by the Codec's algorithm (zram's comp_algorithm: lz4, lz4hc or zstd; see
  ALGORITHMS): an lz4 block without the stored size (the size is always PAGE_SIZE), or a zstd
  frame;
- raw: the compressor did not get the page below the pool's huge watermark, so the page is
  kept as it is, one frame of its own, and reading it costs no decompression (zram's huge
  pages).
A stored object of exactly PAGE_SIZE bytes is raw; anything shorter is compressed.

A batch, as Codec.encode gives it and Codec.decode takes it, is shaped for the pool's batch
calls: `blob` holds the objects back to back (Pool.store_many's argument), `sizes` (array('H'),
one entry per page) each page's object size, 0 for a same-filled page, whose word is in `words`
(array('Q'), one per page, 0 for the others). Decoding takes the same three, so a hole is a
page of size 0 and word 0. No Python object per page on either path.

Two engines run the batches: zfs_ram._codec (C, the GIL released for the whole batch) and the
pure-Python code here, the reference the C one must match byte for byte and the fallback where
it was not built. The engine is chosen once, at import (zfs_ram.native: ZFS_RAM_ENGINE=python
forces this one); a Codec can be made for either, which is how the tests compare them. The
algorithm is the Codec's too (ALGORITHMS): call sites never name it.

zstd is the one algorithm whose bytes may differ between the engines: the compiled one links
the system's libzstd, the pure-Python one uses the zstd that the zstandard package bundles, and
zstd's output changes between its releases. Each decodes the other's frames; the tests compare
bytes only where the two versions are the same (ZSTD_VERSIONS_MATCH).
"""

from __future__ import annotations

import importlib
import os
import queue
import threading
from array import array
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar, cast

import lz4.block
import lz4.frame
import zstandard

from zfs_ram import native

# Re-exported (the `as` form says so to mypy) for the modules that still take it from here.
from zfs_ram.vocabulary import PAGE_SIZE as PAGE_SIZE

WORDS_PER_PAGE = PAGE_SIZE // 8
ZERO_PAGE = bytes(PAGE_SIZE)

#: The compiled engine, or None where the pure-Python one runs (chosen once, here).
COMPILED: ModuleType | None = native.load("codec", "zfs_ram._codec")


T = TypeVar("T")
U = TypeVar("U")


class CorruptPageError(ValueError):
    """A stored object does not decode to exactly one page (both engines raise this)."""


# -- one page: the reference ----------------------------------------------------------------


_frame_compress = lz4.frame.compress


def same_filled_word(page: bytes | bytearray | memoryview) -> int | None:
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
        packed = _lz4_compress(page)
    return page if len(packed) >= huge_size else packed


Encoded = bytes | memoryview | int  # a same-filled word, or the object to store


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


# -- the algorithms -------------------------------------------------------------------------


class Algorithm:
    """A compressor: its name (zram's comp_algorithm), its number in zfs_ram._codec, its level
    (lz4's acceleration), and the pure-Python functions for one page."""

    __slots__ = ("name", "number", "level", "compress", "decompress")

    def __init__(
        self,
        name: str,
        number: int,
        level: int,
        compress: Callable[[Any], bytes],
        decompress: Callable[[bytes], bytes],
    ) -> None:
        self.name = name
        self.number = number
        self.level = level
        self.compress = compress  # one page -> its compressed bytes
        self.decompress = decompress  # compressed bytes -> up to one page

    def __repr__(self) -> str:
        return f"Algorithm({self.name!r})"


# The C engine calls LZ4_compress_default, as the kernel's zram does: for an input under 64 KiB
# it hashes into 16-bit offsets (lz4's byU16 table). lz4.block.compress does not: it compresses
# through a stream (LZ4_compress_fast_continue, 32-bit offsets), which gives other bytes and,
# over 147,641 pages of /usr/lib and /usr/share/doc, 0.64% more of them. An lz4 frame of one
# independent block is compressed by LZ4_compress_fast_extState, the same bytes as
# LZ4_compress_default: the reference cuts them out of the frame.
_FRAME_HEADER = 7  # magic (4), FLG, BD, header checksum: no content size, no dictionary id
_BLOCK_SIZE_FIELD = 4  # little-endian; the top bit set marks a block lz4 stored uncompressed
_UNCOMPRESSED_BLOCK = 1 << 31


def _lz4_compress(page: Any) -> bytes:
    """LZ4_compress_default of one page (see above); a page lz4 does not shrink comes back
    as itself, which is not shorter than any huge_size either."""
    frame: bytes = _frame_compress(
        page,
        block_size=lz4.frame.BLOCKSIZE_MAX64KB,
        block_linked=False,
        content_checksum=False,
        store_size=False,
    )
    start = _FRAME_HEADER + _BLOCK_SIZE_FIELD
    size = int.from_bytes(frame[_FRAME_HEADER:start], "little")
    if size & _UNCOMPRESSED_BLOCK:
        return bytes(page)
    return frame[start : start + size]


def _lz4_decompress(stored: bytes) -> bytes:
    page: bytes = lz4.block.decompress(stored, PAGE_SIZE)
    return page


# The levels zram's backends use unless algorithm_params says otherwise: lz4hc's
# LZ4HC_DEFAULT_CLEVEL and zstd's default level (zstd_default_clevel()).
LZ4HC_LEVEL = 9
ZSTD_LEVEL = 3


def _lz4hc_compress(page: Any) -> bytes:
    """LZ4_compress_HC of one page (python-lz4 calls it for one block as _codec.c does)."""
    packed: bytes = lz4.block.compress(
        page, mode="high_compression", compression=LZ4HC_LEVEL, store_size=False
    )
    return packed


# zstandard's (de)compressors may not be shared between threads: one of each per thread.
_zstd_local = threading.local()


def _zstd_compress(page: Any) -> bytes:
    """One zstd frame (content size, no checksum), as the kernel's zstd backend writes."""
    compressor = getattr(_zstd_local, "compressor", None)
    if compressor is None:
        compressor = _zstd_local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    packed: bytes = compressor.compress(page)
    return packed


def _zstd_decompress(stored: bytes) -> bytes:
    """The page a frame holds; b"" if it is not a valid frame (the caller says corrupt)."""
    decompressor = getattr(_zstd_local, "decompressor", None)
    if decompressor is None:
        decompressor = _zstd_local.decompressor = zstandard.ZstdDecompressor()
    try:
        page: bytes = decompressor.decompress(stored, max_output_size=PAGE_SIZE)
    except zstandard.ZstdError:
        return b""
    return page


#: name -> algorithm, zram's comp_algorithm names; the numbers are _codec.c's enum algorithm.
ALGORITHMS = {
    "lz4": Algorithm("lz4", 0, 1, _lz4_compress, _lz4_decompress),
    "lz4hc": Algorithm("lz4hc", 1, LZ4HC_LEVEL, _lz4hc_compress, _lz4_decompress),
    "zstd": Algorithm("zstd", 2, ZSTD_LEVEL, _zstd_compress, _zstd_decompress),
}
DEFAULT_ALGORITHM = "lz4"

#: Whether both engines run the same zstd release, so that their zstd bytes must be equal.
ZSTD_VERSIONS_MATCH = (
    COMPILED is not None
    and (
        zstandard.ZSTD_VERSION[0] * 10000
        + zstandard.ZSTD_VERSION[1] * 100
        + zstandard.ZSTD_VERSION[2]
    )
    == COMPILED.ZSTD_VERSION
)


class UnknownAlgorithmError(ValueError):
    """A compressor zfs_ram does not have; str() is one line naming the choices."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown compression algorithm {name!r} (choose from {', '.join(ALGORITHMS)})"
        )
        self.name = name


# -- the second thread ----------------------------------------------------------------------

# A batch of at least this many pages is encoded by two threads, half each, on the compiled
# engine: _codec.encode releases the GIL for its whole half, so the halves really run at once
# (benchmarks/codec_bench.py, 1 MiB of /usr/lib: 1.49-1.51x the speed of one thread). The
# pure-Python engine stays on one thread: lz4 releases the GIL only page by page there, and
# the hand-offs cost what the second core gains (0.69-0.98x, the same run; 0.84x for one
# hand-off per page). encode_pages, the old list form, still splits as it always did.
PARALLEL_MIN_PAGES = 32


class _Helper:
    """The second thread: runs one batch task at a time for the caller's thread, which waits
    for its result after doing the other half itself."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child gets a thread of its own (threads do not fork)
        self.tasks: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[bool, object]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="zfs_ram-codec", daemon=True).start()

    def _serve(self) -> None:
        while True:
            task = self.tasks.get()
            try:
                result: tuple[bool, object] = (True, task())
            except BaseException as error:  # handed back, raised in the caller's thread
                result = (False, error)
            # Let go of the task before waiting for the next: its closure holds the caller's
            # pages (a write's whole buffer, up to 1 MiB), which stayed alive until the next
            # batch came (0.84 MiB of RSS after a 1 GiB write, in the heap).
            del task
            self.results.put(result)
            del result


_helper: _Helper | None = None


def _in_parallel(back: Callable[[], T], front: Callable[[], U]) -> tuple[U, T]:
    """front() here and back() on the helper thread, at once; both results, or the error."""
    global _helper
    if _helper is None or _helper.pid != os.getpid():
        _helper = _Helper()
    _helper.tasks.put(back)
    try:
        front_result = front()
    finally:
        ok, back_result = _helper.results.get()  # always taken: the next batch gets its own
    if not ok:
        assert isinstance(back_result, BaseException)
        raise back_result
    return front_result, cast(T, back_result)


def encode_pages(pages: list[memoryview], huge_size: int) -> list[Encoded]:
    """encode_page for each page (the reference's list form); two threads for large lists."""
    if len(pages) < PARALLEL_MIN_PAGES:
        return [encode_page(page, huge_size) for page in pages]
    half = len(pages) // 2
    back = pages[half:]
    compress = _lz4_compress
    encoded, packed = _in_parallel(
        lambda: [compress(page) for page in back],
        lambda: [encode_page(page, huge_size) for page in pages[:half]],
    )
    encoded += [encode_page(page, huge_size, obj) for page, obj in zip(back, packed, strict=True)]
    return encoded


# -- batches --------------------------------------------------------------------------------

Batch = tuple[bytes, "array[int]", "array[int]"]  # blob, sizes ('H'), words ('Q')


def _new_sizes(count: int) -> array[int]:
    return array("H", bytes(2 * count))


def _new_words(count: int) -> array[int]:
    return array("Q", bytes(8 * count))


class Codec:
    """Whole pages <-> batches (see the module comment), with one algorithm and one engine.

    `engine` is native.NATIVE (zfs_ram._codec, ImportError if it was not built),
    native.PYTHON, or None for the engine chosen at import."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM, engine: str | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise UnknownAlgorithmError(algorithm)
        self.algorithm = ALGORITHMS[algorithm]
        if engine is None:
            self.compiled = COMPILED
        elif engine == native.NATIVE:
            self.compiled = importlib.import_module("zfs_ram._codec")
        elif engine == native.PYTHON:
            self.compiled = None
        else:
            raise ValueError(f"unknown engine {engine!r}")
        self.engine = native.NATIVE if self.compiled is not None else native.PYTHON

    def __repr__(self) -> str:
        return f"Codec({self.algorithm.name!r}, engine={self.engine!r})"

    # -- encode ---------------------------------------------------------------------------

    def encode(self, src: bytes | memoryview, huge_size: int) -> Batch:
        """The batch for the whole pages in src (len(src) a multiple of PAGE_SIZE): objects
        not shorter than huge_size are kept raw. Large batches run on two threads."""
        view = memoryview(src).cast("B")
        count = len(view) // PAGE_SIZE
        if count < PARALLEL_MIN_PAGES or self.compiled is None:
            return self._encode(view, huge_size)
        half = count // 2 * PAGE_SIZE
        front, back = _in_parallel(
            lambda: self._encode(view[half:], huge_size),
            lambda: self._encode(view[:half], huge_size),
        )
        blob, sizes, words = front
        back_blob, back_sizes, back_words = back
        sizes.extend(back_sizes)
        words.extend(back_words)
        return blob + back_blob, sizes, words

    def _encode(self, view: memoryview, huge_size: int) -> Batch:
        """encode() on one thread."""
        if len(view) % PAGE_SIZE:
            raise ValueError(f"{len(view)} bytes are not whole pages")
        count = len(view) // PAGE_SIZE
        sizes, words = _new_sizes(count), _new_words(count)
        if self.compiled is not None:
            algorithm = self.algorithm
            blob = self.compiled.encode(
                algorithm.number, algorithm.level, view, huge_size, sizes, words
            )
            return blob, sizes, words
        if not 1 <= huge_size <= PAGE_SIZE:
            raise ValueError(f"huge_size {huge_size} is not in 1..{PAGE_SIZE}")
        compress = self.algorithm.compress
        objects: list[bytes | memoryview] = []
        for i in range(count):
            page = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            word = same_filled_word(page)
            if word is not None:
                words[i] = word
                continue
            packed = compress(page)
            stored = page if len(packed) >= huge_size else packed
            objects.append(stored)
            sizes[i] = len(stored)
        return b"".join(objects), sizes, words

    def encode_page(
        self, page: bytes | bytearray | memoryview, huge_size: int
    ) -> bytes | bytearray | memoryview | int:
        """One page as encode() would encode it: the object to store, or (same-filled) its
        word. The one-page write's path: no arrays, no blob."""
        if self.compiled is not None:
            result: bytes | int = self.compiled.encode_page(
                self.algorithm.number, self.algorithm.level, page, huge_size
            )
            return result
        if len(page) != PAGE_SIZE:
            raise ValueError(f"{len(page)} bytes are not one page")
        if not 1 <= huge_size <= PAGE_SIZE:
            raise ValueError(f"huge_size {huge_size} is not in 1..{PAGE_SIZE}")
        word = same_filled_word(page)
        if word is not None:
            return word
        packed = self.algorithm.compress(page)
        return page if len(packed) >= huge_size else packed

    # -- decode ---------------------------------------------------------------------------

    def decode_object(self, stored: bytes) -> bytes:
        """The page one stored object stands for (a raw page is its own object): the one-page
        read's path. Raises CorruptPageError if it does not decode to exactly one page."""
        if len(stored) == PAGE_SIZE:
            return stored
        try:
            page = self.algorithm.decompress(stored)
        except lz4.block.LZ4BlockError:
            page = b""
        if len(page) != PAGE_SIZE:
            raise CorruptPageError("the object does not decompress to one page")
        return page

    def decode(
        self,
        blob: bytes | memoryview,
        sizes: array[int],
        words: array[int],
        skip: int = 0,
        length: int | None = None,
        secondary: Codec | None = None,
        priorities: bytes | bytearray | None = None,
    ) -> bytes:
        """`length` bytes (by default all) of the pages a batch describes, from byte `skip` of
        the first. A page whose byte in `priorities` (one per page) is not 0 was encoded by
        `secondary` (zram's recomp_algorithm). Raises CorruptPageError if an object does not
        decode to one page."""
        if length is None:
            length = len(sizes) * PAGE_SIZE - skip
        if priorities is not None and secondary is None:
            raise ValueError("priorities without a secondary codec")
        if self.compiled is not None:
            mixed = (
                ()
                if secondary is None or priorities is None
                else (
                    secondary.algorithm.number,
                    priorities,
                )
            )
            try:
                result: bytes = self.compiled.decode(
                    self.algorithm.number, blob, sizes, words, skip, length, *mixed
                )
            except self.compiled.CorruptError as error:
                raise CorruptPageError(str(error)) from None
            return result
        return self._decode_python(blob, sizes, words, skip, length, secondary, priorities)

    def decode_into(
        self,
        blob: bytes | memoryview,
        sizes: array[int],
        words: array[int],
        out: bytearray | memoryview,
        skip: int = 0,
    ) -> None:
        """decode() straight into `out` (len(out) bytes from byte `skip` of the first page)."""
        if self.compiled is not None:
            try:
                self.compiled.decode_into(self.algorithm.number, blob, sizes, words, out, skip)
            except self.compiled.CorruptError as error:
                raise CorruptPageError(str(error)) from None
            return
        memoryview(out).cast("B")[:] = self._decode_python(blob, sizes, words, skip, len(out))

    def _decode_python(
        self,
        blob: bytes | memoryview,
        sizes: array[int],
        words: array[int],
        skip: int,
        length: int,
        secondary: Codec | None = None,
        priorities: bytes | bytearray | None = None,
    ) -> bytes:
        count = len(sizes)
        if priorities is not None and len(priorities) != count:
            raise ValueError(f"priorities holds {len(priorities)} items, not {count}")
        if len(words) != count:
            raise ValueError(f"words holds {len(words)} items, not {count}")
        if not 0 <= skip < PAGE_SIZE or not 0 <= length <= count * PAGE_SIZE - skip:
            raise ValueError(f"{length} bytes from byte {skip} do not lie within {count} pages")
        if max(sizes, default=0) > PAGE_SIZE:
            raise CorruptPageError("an object is longer than a page")
        if sum(sizes) != len(blob):
            raise CorruptPageError(
                f"the objects' sizes add up to {sum(sizes)} bytes, the blob has {len(blob)}"
            )
        view = memoryview(blob).cast("B")
        decompress = self.algorithm.decompress
        second = secondary.algorithm.decompress if secondary is not None else decompress
        pages: list[bytes | memoryview] = []
        position = 0
        for i in range(-(-(skip + length) // PAGE_SIZE)):
            size = sizes[i]
            stored = view[position : position + size]
            position += size
            if size == 0:
                pages.append(fill_page(words[i]))
            elif size == PAGE_SIZE:
                pages.append(stored)
            else:
                try:
                    if priorities is not None and priorities[i]:
                        page = second(bytes(stored))
                    else:
                        page = decompress(bytes(stored))
                except lz4.block.LZ4BlockError:  # zstd's errors come back as b""
                    page = b""
                if len(page) != PAGE_SIZE:
                    raise CorruptPageError(
                        f"object {i} is corrupt: it does not decompress to one page"
                    )
                pages.append(page)
        if len(pages) == 1 and skip == 0 and length == PAGE_SIZE:
            return bytes(pages[0])
        return b"".join(pages)[skip : skip + length]


#: The codec the page store uses unless it is given another: lz4 on the engine chosen above.
DEFAULT_CODEC = Codec()
