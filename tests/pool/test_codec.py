"""The page codec: what each kind of page becomes, on both engines, in one thread or two.

The compiled engine (zfs_ram._codec) must give the reference's bytes exactly: hypothesis draws
batches of every kind of page and every huge_size and compares the two engines' batches, and
their decoding of any byte range of it, against each other and the source. lz4's output must be
LZ4_compress_default's (what the kernel's zram calls), checked against liblz4 itself. Corrupt
batches must raise CorruptPageError on both engines and never write past the output buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import sys
import threading
import time
from array import array

import hypothesis.strategies as st
import lz4.block
import pytest
from hypothesis import given, settings

from zfs_ram import codec, native

PAGE = codec.PAGE_SIZE
HUGE = 3633
PYTHON = codec.Codec(engine="python")
NATIVE = codec.Codec(engine="native")
ENGINES = [PYTHON, NATIVE]


def text_page(rng: random.Random) -> bytes:
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta, ", bytes([rng.randrange(256)])]
    return b"".join(rng.choice(words) for _ in range(PAGE))[:PAGE]


def page_of(kind: str, rng: random.Random) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "same":
        return rng.randbytes(8) * (PAGE // 8)
    if kind == "random":
        return rng.randbytes(PAGE)
    if kind == "text":
        return text_page(rng)
    if kind == "half":  # half text, half random: near the huge watermark
        return text_page(rng)[: PAGE // 2] + rng.randbytes(PAGE // 2)
    if kind == "almost_same":  # one word repeated but the last (or a middle one) differs
        page = bytearray(rng.randbytes(8) * (PAGE // 8))
        page[rng.choice([0, PAGE - 1, PAGE // 2])] ^= 1
        return bytes(page)
    raise ValueError(kind)


KINDS = ["zero", "same", "random", "text", "half", "almost_same"]


def mixed_pages(count: int, seed: int) -> list[memoryview]:
    rng = random.Random(seed)
    pages = [page_of(KINDS[i % len(KINDS)], rng) for i in range(count)]
    return [memoryview(b"".join(pages))[i * PAGE : (i + 1) * PAGE] for i in range(count)]


def serial(pages: list[memoryview]) -> list[codec.Encoded]:
    return [codec.encode_page(page, HUGE) for page in pages]


def as_comparable(encoded: list[codec.Encoded]) -> list[object]:
    return [e if isinstance(e, int) else bytes(e) for e in encoded]


def as_batch(encoded: list[codec.Encoded]) -> tuple[bytes, list[int], list[int]]:
    """The batch the old one-page encodings make up."""
    blob = b"".join(bytes(e) for e in encoded if not isinstance(e, int))
    sizes = [0 if isinstance(e, int) else len(e) for e in encoded]
    words = [e if isinstance(e, int) else 0 for e in encoded]
    return blob, sizes, words


# -- lz4 is LZ4_compress_default ------------------------------------------------------------


def liblz4_compress_default(page: bytes) -> bytes:
    path = ctypes.util.find_library("lz4")
    assert path is not None
    lib = ctypes.CDLL(path)
    dst = ctypes.create_string_buffer(2 * PAGE)
    size = lib.LZ4_compress_default(page, dst, len(page), len(dst))
    assert size > 0
    return dst.raw[:size]


@pytest.mark.parametrize("kind", ["text", "half", "almost_same"])
def test_both_engines_give_lz4_compress_default_bytes(kind: str) -> None:
    rng = random.Random(kind)
    pages = [page_of(kind, rng) for _ in range(8)]
    expected = [liblz4_compress_default(page) for page in pages]
    for engine in ENGINES:
        blob, sizes, words = engine.encode(b"".join(pages), PAGE)  # PAGE: nothing kept raw
        assert blob == b"".join(expected) and list(sizes) == [len(e) for e in expected]
        assert list(words) == [0] * len(pages)
    # Still lz4's block format: python-lz4 reads it back.
    for page, packed in zip(pages, expected, strict=True):
        assert lz4.block.decompress(packed, PAGE) == page


def test_the_reference_compresses_real_data_as_liblz4() -> None:
    """Pages of a real binary: the frame-cut reference equals LZ4_compress_default."""
    with open(sys.executable, "rb") as file:
        data = file.read(64 * PAGE)
    for i in range(0, len(data) // PAGE * PAGE, PAGE):
        page = data[i : i + PAGE]
        packed = liblz4_compress_default(page)
        if len(packed) < PAGE:
            assert codec.ALGORITHMS["lz4"].compress(page) == packed


# -- both engines alike ---------------------------------------------------------------------

PAGE_KINDS = st.lists(st.sampled_from(KINDS), min_size=0, max_size=12)
HUGE_SIZES = st.one_of(st.sampled_from([1, 2048, HUGE, PAGE - 1, PAGE]), st.integers(1, PAGE))


def batch_source(kinds: list[str], seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(page_of(kind, rng) for kind in kinds)


@settings(max_examples=150, deadline=None)
@given(kinds=PAGE_KINDS, seed=st.integers(0, 2**32), huge_size=HUGE_SIZES, data=st.data())
def test_the_engines_encode_and_decode_alike(
    kinds: list[str], seed: int, huge_size: int, data: st.DataObject
) -> None:
    src = batch_source(kinds, seed)
    python, compiled = PYTHON.encode(src, huge_size), NATIVE.encode(src, huge_size)
    assert python == compiled  # the same blob and the same arrays ('H' and 'Q')
    blob, sizes, words = python
    assert (sizes.typecode, words.typecode) == ("H", "Q")
    # The reference's one-page rule says the same.
    pages = [memoryview(src)[i : i + PAGE] for i in range(0, len(src), PAGE)]
    assert as_batch([codec.encode_page(p, huge_size) for p in pages]) == (
        blob,
        list(sizes),
        list(words),
    )
    for size in sizes:
        assert size == 0 or size == PAGE or size < huge_size
    skip = data.draw(st.integers(0, PAGE - 1)) if src else 0
    length = data.draw(st.integers(0, max(len(src) - skip, 0)))
    for engine in ENGINES:
        assert engine.decode(blob, sizes, words) == src
        assert engine.decode(blob, sizes, words, skip, length) == src[skip : skip + length]
        out = bytearray(b"\xa5" * (length + 16))
        engine.decode_into(blob, sizes, words, memoryview(out)[8 : 8 + length], skip)
        assert out[8 : 8 + length] == src[skip : skip + length]
        assert out[:8] == out[8 + length :] == b"\xa5" * 8  # nothing written around it


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.engine)
def test_holes_and_words_decode_as_filled_pages(engine: codec.Codec) -> None:
    sizes = array("H", [0, 0, 0])
    words = array("Q", [0, 0x0102030405060708, 2**64 - 1])
    expected = bytes(PAGE) + bytes(range(8, 0, -1)) * (PAGE // 8) + b"\xff" * PAGE
    assert engine.decode(b"", sizes, words) == expected
    assert engine.decode(b"", sizes, words, 5, 2 * PAGE) == expected[5 : 5 + 2 * PAGE]


# -- corrupt input --------------------------------------------------------------------------


def good_batch() -> tuple[bytes, array[int], array[int]]:
    rng = random.Random(5)
    src = b"".join(page_of(k, rng) for k in ["text", "zero", "random", "text", "same"])
    return NATIVE.encode(src, HUGE)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.engine)
def test_corrupt_batches_raise(engine: codec.Codec) -> None:
    blob, sizes, words = good_batch()
    first = sizes[0]
    assert 0 < first < PAGE
    cases = {
        "an object cut short": (blob[: first - 1] + blob[first:], sizes),
        "the blob too long": (blob + b"x", sizes),
        "the blob too short": (blob[:-1], sizes),
        "an object longer than a page": (blob, array("H", [PAGE + 1] + list(sizes[1:]))),
        "garbage": (b"\xff" * first + blob[first:], sizes),
    }
    for name, (bad_blob, bad_sizes) in cases.items():
        out = bytearray(len(sizes) * PAGE)
        with pytest.raises(codec.CorruptPageError):
            engine.decode(bad_blob, bad_sizes, words)
        with pytest.raises(codec.CorruptPageError):
            engine.decode_into(bad_blob, bad_sizes, words, out)
        assert name


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.engine)
def test_an_object_that_decompresses_short_is_corrupt(engine: codec.Codec) -> None:
    short = lz4.block.compress(b"a" * 100, store_size=False)  # valid lz4, but not a page
    with pytest.raises(codec.CorruptPageError):
        engine.decode(short, array("H", [len(short)]), array("Q", [0]))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.engine)
def test_arguments_that_do_not_fit_are_refused(engine: codec.Codec) -> None:
    blob, sizes, words = good_batch()
    with pytest.raises(ValueError):
        engine.decode(blob, sizes, words, 0, len(sizes) * PAGE + 1)
    with pytest.raises(ValueError):
        engine.decode(blob, sizes, words, PAGE, 1)
    with pytest.raises(ValueError):
        engine.decode(blob, sizes, words[:-1])
    with pytest.raises(ValueError):
        engine.encode(b"x" * (PAGE + 1), HUGE)
    for huge_size in (0, PAGE + 1):
        with pytest.raises(ValueError):
            engine.encode(bytes(PAGE), huge_size)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), flips=st.integers(1, 8))
def test_flipped_bytes_never_overrun_and_both_engines_agree(seed: int, flips: int) -> None:
    """A corrupted blob either decodes (lz4 has no checksum) or raises, the same on both."""
    rng = random.Random(seed)
    blob, sizes, words = good_batch()
    bad = bytearray(blob)
    for _ in range(flips):
        bad[rng.randrange(len(bad))] = rng.randrange(256)
    results = []
    for engine in ENGINES:
        out = bytearray(b"\x5a" * (len(sizes) * PAGE + 32))
        try:
            engine.decode_into(bytes(bad), sizes, words, memoryview(out)[16:-16])
            results.append(bytes(out))
        except codec.CorruptPageError:
            results.append(b"corrupt")
        assert out[:16] == out[-16:] == b"\x5a" * 16
    assert results[0] == results[1]


# -- two threads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count",
    [1, codec.PARALLEL_MIN_PAGES - 1, codec.PARALLEL_MIN_PAGES, codec.PARALLEL_MIN_PAGES + 1, 256],
)
def test_two_threads_encode_as_one(count: int) -> None:
    pages = mixed_pages(count, count)
    encoded = codec.encode_pages(pages, HUGE)
    assert as_comparable(encoded) == as_comparable(serial(pages))
    for page, item in zip(pages, encoded, strict=True):
        if isinstance(item, int):
            assert codec.fill_page(item) == page
        else:
            assert codec.decode(bytes(item)) == page
    src = b"".join(pages)
    batch = as_batch(encoded)
    for engine in ENGINES:  # a batch of PARALLEL_MIN_PAGES or more is split between threads
        blob, sizes, words = engine.encode(src, HUGE)
        assert (blob, list(sizes), list(words)) == batch
        assert engine.decode(blob, sizes, words) == src


def test_the_helper_thread_is_remade_after_fork() -> None:
    pages = mixed_pages(64, 1)
    expected = as_comparable(serial(pages))
    assert as_comparable(codec.encode_pages(pages, HUGE)) == expected  # helper started here
    batch = NATIVE.encode(b"".join(pages), HUGE)
    pid = os.fork()
    if pid == 0:  # the child has no helper thread; a stale one would hang the write forever
        ok = as_comparable(codec.encode_pages(pages, HUGE)) == expected
        ok = ok and NATIVE.encode(b"".join(pages), HUGE) == batch
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_error_in_the_helper_reaches_the_caller_and_the_next_write_works() -> None:
    pages = mixed_pages(64, 2)
    bad = pages[:40] + [object()] * 24  # type: ignore[list-item]  # the error under test
    with pytest.raises(TypeError):
        codec.encode_pages(bad, HUGE)
    assert as_comparable(codec.encode_pages(pages, HUGE)) == as_comparable(serial(pages))
    with pytest.raises(ValueError):  # the back half, on the helper, is not whole pages
        NATIVE.encode(b"x" * (64 * PAGE + 1), HUGE)
    src = b"".join(pages)
    assert NATIVE.encode(src, HUGE) == PYTHON.encode(src, HUGE)


def test_the_engine_is_chosen_once_and_said() -> None:
    assert codec.DEFAULT_CODEC.engine == (
        native.PYTHON if codec.COMPILED is None else native.NATIVE
    )
    assert native.engines()["codec"] == codec.DEFAULT_CODEC.engine
    with pytest.raises(ValueError):
        codec.Codec("lzo")


def test_the_compiled_batch_runs_without_the_gil() -> None:
    """Another thread keeps running while one call encodes, or decodes, 8 MiB: the GIL is
    released for the whole batch. Held, the other thread could run only before the call or
    after it, never in the first half of it (after it, it may run before the caller reads
    the clock, which is why only the first half counts)."""
    rng = random.Random(9)
    src = b"".join(page_of("text", rng) for _ in range(16)) * 128  # 8 MiB
    batch = NATIVE.encode(src, HUGE)
    stamps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            for _ in range(100):
                pass
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=tick)
    thread.start()
    inside = {"encode": 0, "decode": 0}
    try:
        time.sleep(0.01)  # the other thread is running
        for _ in range(3):
            for name, call in (
                ("encode", lambda: NATIVE._encode(memoryview(src), HUGE)),  # one call
                ("decode", lambda: NATIVE.decode(*batch)),
            ):
                start = time.perf_counter()
                call()
                half = start + (time.perf_counter() - start) / 2
                inside[name] += sum(1 for stamp in stamps[-100000:] if start < stamp < half)
    finally:
        stop.set()
        thread.join()
    assert inside["encode"] > 0 and inside["decode"] > 0, inside
