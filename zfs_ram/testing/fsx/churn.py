"""The churn workload: several processes publishing, reading, renaming and deleting
self-checking files in one shared directory.

Each file carries its own length and sha256 in a header (``churn_content``), so a reader can
tell a whole file from a torn one without a model: the workers share nothing but the
directory. ``run_churn`` is one worker; ``verify_churn_tree`` checks whatever they left.
Renames are the only way a file becomes visible, so a reader must never meet a torn file.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from zfs_ram.testing.fsx.driver import FsxFailure, drop_cache, make_data

__all__ = [
    "LAST_FILE",
    "ChurnResult",
    "check_churn_content",
    "churn_content",
    "run_churn",
    "verify_churn_tree",
]

CHURN_MAGIC = b"ZFSRAMCHURN1"
CHURN_HEADER = struct.Struct("<12sQ32s")  # magic, body length, sha256 of the body
SHARED = "shared"


@dataclass
class ChurnResult:
    published: int = 0
    verified: int = 0
    renamed: int = 0
    deleted: int = 0
    raced: int = 0  # operations that found their file gone (another worker got there first)


#: The file each churn worker leaves in its own directory when it is done.
LAST_FILE = "last"


def churn_content(rng: random.Random, length: int, tag: int) -> bytes:
    """A self-checking file: header with length and sha256, then a body of mixed kinds."""
    _, body = make_data(rng, length, tag)
    return CHURN_HEADER.pack(CHURN_MAGIC, len(body), hashlib.sha256(body).digest()) + body


def check_churn_content(data: bytes) -> str | None:
    """None if the file is whole, else what is wrong with it."""
    if len(data) < CHURN_HEADER.size:
        return f"{len(data)} bytes, shorter than the header"
    magic, length, digest = CHURN_HEADER.unpack_from(data)
    if magic != CHURN_MAGIC:
        return f"bad magic {magic!r}"
    body = data[CHURN_HEADER.size :]
    if len(body) != length:
        return f"body of {len(body)} bytes, header says {length}"
    if hashlib.sha256(body).digest() != digest:
        return "sha256 of the body does not match the header"
    return None


def run_churn(
    root: Path, worker: int, seed: int, ops: int, max_len: int = 192 << 10
) -> ChurnResult:
    """One of several processes sharing ROOT/shared: publish, read, rename, delete.

    Files are written whole in the worker's own directory and published by rename, so a reader
    never meets a half-written file; every read checks the file's own sha256. Races with the
    other workers (the file was renamed or deleted meanwhile) are expected and counted. At the
    end the worker leaves one file, ROOT/wWORKER/last, for the check of the whole tree.
    Raises FsxFailure on a torn or wrong file.
    """
    rng = random.Random(seed * 1000 + worker)
    own = root / f"w{worker}"
    shared = root / SHARED
    own.mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)
    result = ChurnResult()
    for step in range(ops):
        action = rng.choices(("publish", "read", "rename", "delete", "rewrite"), (4, 6, 2, 2, 1))[0]
        try:
            if action == "publish":
                name = f"w{worker}-{step}"
                data = churn_content(rng, rng.randrange(max_len), step)
                (own / name).write_bytes(data)
                os.rename(own / name, shared / name)
                result.published += 1
                continue
            names = sorted(os.listdir(shared))
            if not names:
                continue
            name = rng.choice(names)
            if action == "read":
                with open(shared / name, "rb") as f:
                    drop_cache(f.fileno())
                    problem = check_churn_content(f.read())
                if problem is not None:
                    raise FsxFailure(
                        f"churn worker {worker} seed {seed} step {step}: {SHARED}/{name}: {problem}"
                    )
                result.verified += 1
            elif action == "rename":  # may replace another worker's file: atomic either way
                os.rename(shared / name, shared / rng.choice(names + [f"r{worker}-{step}"]))
                result.renamed += 1
            elif action == "delete":
                os.unlink(shared / name)
                result.deleted += 1
            else:  # take a file private, cut and rewrite a copy of it, publish that
                os.rename(shared / name, own / name)
                # A reader that opened the file before it went private may still be reading
                # it: rewriting that inode in place would hand it a torn file, legitimately.
                # So the cut and rewrite happen on a copy nobody else can have open.
                copy = own / f"{name}.new"
                shutil.copyfile(own / name, copy)
                data = churn_content(rng, rng.randrange(max_len), step)
                with open(copy, "r+b") as f:
                    f.truncate(rng.randrange(len(data) + 1))
                    f.seek(0)
                    f.write(data)
                    f.truncate(len(data))
                os.rename(copy, shared / name)
                os.unlink(own / name)
                result.renamed += 1
        except FileNotFoundError:
            result.raced += 1
    # The shared directory may end up empty (deletes and replacing renames can outrun the
    # publishes), so each worker leaves one file in its own directory, where nobody else goes,
    # for the check of the whole tree afterwards.
    (own / LAST_FILE).write_bytes(churn_content(rng, rng.randrange(max_len), ops))
    return result


def verify_churn_tree(root: Path) -> int:
    """Check every file under root by its checksum; returns how many. Raises FsxFailure."""
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            problem = check_churn_content(path.read_bytes())
            if problem is not None:
                raise FsxFailure(f"{path}: {problem}")
            count += 1
    return count
