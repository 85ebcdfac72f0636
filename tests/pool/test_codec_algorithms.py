"""The codec's compressors (zram's comp_algorithm): lz4, lz4hc and zstd, on both engines.

lz4hc must be liblz4's LZ4_compress_HC at zram's default level, byte for byte on both engines;
zstd the system libzstd's ZSTD_compress at level 3 on the compiled engine. The engines are
compared as for lz4 (hypothesis draws batches of every kind of page and every huge_size): the
same bytes, except zstd's where the two engines link different zstd releases; then each engine
must decode the other's batch, and the same pages must be found same-filled.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import sys
from array import array

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from test_codec import HUGE, HUGE_SIZES, PAGE_KINDS, batch_source, good_batch, page_of

from zfs_ram import codec

PAGE = codec.PAGE_SIZE
NAMES = list(codec.ALGORITHMS)
ZRAM_LZ4HC_LEVEL = 9  # the kernel's LZ4HC_DEFAULT_CLEVEL, zram's lz4hc level unless set


def engines(name: str) -> list[codec.Codec]:
    return [codec.Codec(name, engine="python"), codec.Codec(name, engine="native")]


def library(name: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name)
    assert path is not None, name
    return ctypes.CDLL(path)


def liblz4_compress_hc(page: bytes) -> bytes:
    dst = ctypes.create_string_buffer(2 * PAGE)
    size = library("lz4").LZ4_compress_HC(page, dst, len(page), len(dst), ZRAM_LZ4HC_LEVEL)
    assert size > 0
    return dst.raw[:size]


def libzstd_compress(page: bytes) -> bytes:
    lib = library("zstd")
    lib.ZSTD_compress.restype = ctypes.c_size_t
    dst = ctypes.create_string_buffer(2 * PAGE)
    size = lib.ZSTD_compress(dst, ctypes.c_size_t(len(dst)), page, ctypes.c_size_t(len(page)), 3)
    assert not lib.ZSTD_isError(ctypes.c_size_t(size))
    return dst.raw[:size]


def real_pages(count: int) -> list[bytes]:
    with open(sys.executable, "rb") as file:
        data = file.read(count * PAGE)
    return [data[i : i + PAGE] for i in range(0, len(data) // PAGE * PAGE, PAGE)]


def test_the_names_are_zrams_and_lz4_is_the_default() -> None:
    assert NAMES == ["lz4", "lz4hc", "zstd"]
    assert codec.DEFAULT_ALGORITHM == "lz4" == codec.Codec().algorithm.name


def test_an_unknown_algorithm_is_one_clear_error() -> None:
    with pytest.raises(codec.UnknownAlgorithmError) as excinfo:
        codec.Codec("lzo")
    assert str(excinfo.value) == (
        "unknown compression algorithm 'lzo' (choose from lz4, lz4hc, zstd)"
    )


@pytest.mark.parametrize("kind", ["text", "half", "almost_same"])
def test_both_engines_give_lz4_compress_hc_bytes(kind: str) -> None:
    rng = random.Random(kind)
    pages = [page_of(kind, rng) for _ in range(6)] + real_pages(16)
    expected = [liblz4_compress_hc(page) for page in pages]
    for engine in engines("lz4hc"):
        blob, sizes, _words = engine.encode(b"".join(pages), PAGE)
        kept = [e if len(e) < PAGE else page for e, page in zip(expected, pages, strict=True)]
        assert blob == b"".join(kept)
        assert list(sizes) == [len(e) for e in kept]


def test_the_compiled_engine_gives_libzstd_bytes() -> None:
    rng = random.Random(3)
    pages = [page_of("text", rng) for _ in range(4)] + real_pages(16)
    native = codec.Codec("zstd", engine="native")
    for page in pages:
        packed = libzstd_compress(page)
        assert native.encode_page(page, PAGE) == (packed if len(packed) < PAGE else page)


@pytest.mark.parametrize("name", NAMES)
def test_stronger_algorithms_store_real_pages_in_fewer_bytes(name: str) -> None:
    pages = b"".join(real_pages(64))
    sizes = {n: len(codec.Codec(n).encode(pages, PAGE)[0]) for n in NAMES}
    assert sizes["zstd"] < sizes["lz4hc"] < sizes["lz4"]
    assert codec.Codec(name).decode(*codec.Codec(name).encode(pages, PAGE)) == pages


def bytes_must_match(name: str) -> bool:
    return name != "zstd" or codec.ZSTD_VERSIONS_MATCH


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    kinds=PAGE_KINDS,
    seed=st.integers(0, 2**32),
    huge_size=HUGE_SIZES,
    data=st.data(),
)
def test_the_engines_encode_and_decode_alike(
    name: str, kinds: list[str], seed: int, huge_size: int, data: st.DataObject
) -> None:
    src = batch_source(kinds, seed)
    python, native = engines(name)
    batches = [python.encode(src, huge_size), native.encode(src, huge_size)]
    (py_blob, py_sizes, py_words), (c_blob, c_sizes, c_words) = batches
    if bytes_must_match(name):
        assert batches[0] == batches[1]
    assert py_words == c_words  # same-filled pages are the same on any compressor
    for py_size, c_size in zip(py_sizes, c_sizes, strict=True):
        assert (py_size == 0) == (c_size == 0)
    for engine in (python, native):
        for blob, sizes, words in batches:
            for size in sizes:
                assert size == 0 or size == PAGE or size < huge_size
            assert engine.decode(blob, sizes, words) == src
            skip = data.draw(st.integers(0, PAGE - 1)) if src else 0
            length = data.draw(st.integers(0, max(len(src) - skip, 0)))
            out = bytearray(length)
            engine.decode_into(blob, sizes, words, out, skip)
            assert out == src[skip : skip + length]
        # One page at a time says the same as the batch.
        own_blob, own_sizes, _ = engine.encode(src, huge_size)
        objects = [
            engine.encode_page(src[i : i + PAGE], huge_size) for i in range(0, len(src), PAGE)
        ]
        assert b"".join(bytes(o) for o in objects if not isinstance(o, int)) == own_blob
        for stored, size in zip(objects, own_sizes, strict=True):
            if not isinstance(stored, int):
                assert engine.decode_object(bytes(stored)) == engine.decode(
                    bytes(stored), array("H", [size]), array("Q", [0])
                )


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_objects_raise_on_both_engines(name: str) -> None:
    rng = random.Random(5)
    src = b"".join(page_of(k, rng) for k in ["text", "zero", "random", "text", "same"])
    for engine in engines(name):
        blob, sizes, words = engine.encode(src, HUGE)
        first = sizes[0]
        assert 0 < first < PAGE
        cut = first // 2  # the first object cut short
        short_sizes = array("H", [cut, *sizes[1:]])
        cases = [(b"\xff" * first + blob[first:], sizes), (blob[:cut] + blob[first:], short_sizes)]
        for bad, bad_sizes in cases:
            with pytest.raises(codec.CorruptPageError):
                engine.decode(bad, bad_sizes, words)
            with pytest.raises(codec.CorruptPageError):
                engine.decode_object(bad[: bad_sizes[0]])


@pytest.mark.parametrize("name", NAMES)
def test_a_frame_of_another_size_is_corrupt(name: str) -> None:
    short = codec.ALGORITHMS[name].compress(b"a" * 100)  # valid, but not a page
    for engine in engines(name):
        with pytest.raises(codec.CorruptPageError):
            engine.decode(short, array("H", [len(short)]), array("Q", [0]))
        with pytest.raises(codec.CorruptPageError):
            engine.decode_object(short)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), flips=st.integers(1, 8))
def test_flipped_zstd_bytes_never_overrun(seed: int, flips: int) -> None:
    """A corrupted zstd batch decodes or raises on each engine, never writing past `out`."""
    rng = random.Random(seed)
    blob, sizes, words = good_batch()  # lz4 objects: zstd must refuse most of them
    zblob, zsizes, zwords = codec.Codec("zstd", engine="native").encode(
        codec.Codec(engine="native").decode(blob, sizes, words), HUGE
    )
    bad = bytearray(zblob)
    for _ in range(flips):
        bad[rng.randrange(len(bad))] = rng.randrange(256)
    for engine in engines("zstd"):
        out = bytearray(b"\x5a" * (len(zsizes) * PAGE + 32))
        with contextlib.suppress(codec.CorruptPageError):
            engine.decode_into(bytes(bad), zsizes, zwords, memoryview(out)[16:-16])
        assert out[:16] == out[-16:] == b"\x5a" * 16
