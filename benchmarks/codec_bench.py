"""The codec in-process: encoding and decoding 1 MiB of real data, one thread or two, per engine.

A quick timeit, no mount: the data is the first MiBs of the shared libraries in /usr/lib, cut
into 1 MiB writes the way a FUSE write with max_write=1 MiB arrives. For each engine, encoding
runs on one thread (PARALLEL_MIN_PAGES raised past the batch) and on two (the default), and
decoding a whole batch into one reply. Prints the best of `--repeat` runs in ms per MiB.

    .venv/bin/python benchmarks/codec_bench.py [--mib 16] [--repeat 5] [--algorithm zstd]

--algorithm chooses the compressor (zram's comp_algorithm names; default lz4), to compare
lz4's speed with lz4hc's and zstd's on the same data.
"""

from __future__ import annotations

import argparse
import functools
import glob
import time
from collections.abc import Callable

from zfs_ram import codec, native

MIB = 1 << 20
HUGE = 3633  # zsmalloc's huge watermark here


def real_data(mib: int) -> list[bytes]:
    """`mib` 1 MiB pieces of the shared libraries in /usr/lib, in order."""
    pieces: list[bytes] = []
    buffer = b""
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")):
        try:
            with open(path, "rb") as file:
                buffer += file.read(4 * MIB)
        except OSError:
            continue
        while len(buffer) >= MIB and len(pieces) < mib:
            pieces.append(buffer[:MIB])
            buffer = buffer[MIB:]
        if len(pieces) == mib:
            break
    return pieces


def best_ms(run: Callable[[bytes], object], pieces: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for piece in pieces:
            run(piece)
        best = min(best, time.perf_counter() - start)
    return best / len(pieces) * 1e3


def decode_piece(c: codec.Codec, batches: dict[int, codec.Batch], piece: bytes) -> bytes:
    return c.decode(*batches[id(piece)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--algorithm", choices=list(codec.ALGORITHMS), default="lz4")
    args = parser.parse_args()
    pieces = real_data(args.mib)
    results: dict[str, float] = {}
    for engine in (native.PYTHON, native.NATIVE):
        c = codec.Codec(args.algorithm, engine=engine)
        batches = {id(piece): c.encode(piece, HUGE) for piece in pieces}
        for threads in (1, 2):
            codec.PARALLEL_MIN_PAGES = 32 if threads == 2 else 1 << 30
            results[f"{engine} encode {threads}T"] = best_ms(
                functools.partial(c.encode, huge_size=HUGE), pieces, args.repeat
            )
        codec.PARALLEL_MIN_PAGES = 32
        results[f"{engine} decode"] = best_ms(
            functools.partial(decode_piece, c, batches), pieces, args.repeat
        )
    stored = sum(len(codec.Codec(args.algorithm).encode(p, HUGE)[0]) for p in pieces)
    print(
        f"{len(pieces)} MiB of /usr/lib, {args.algorithm}-compressed to"
        f" {stored / len(pieces) / MIB:.3f}"
    )
    for name, ms in results.items():
        print(f"{name:24s} {ms:7.3f} ms/MiB  {1000 / ms:7.0f} MiB/s")
    for engine in (native.PYTHON, native.NATIVE):
        one, two = results[f"{engine} encode 1T"], results[f"{engine} encode 2T"]
        print(f"{engine}: 2 threads / 1 thread = {one / two:.2f}x faster")
    for step in ("encode 2T", "decode"):
        ratio = results[f"python {step}"] / results[f"native {step}"]
        print(f"native / python {step} = {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
