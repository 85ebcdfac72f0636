"""Whole pages of each kind the page store treats differently, for the page-store tests."""

from __future__ import annotations

import random

from zfs_ram.vocabulary import PAGE_SIZE

#: zero and same-filled pages (no object), text (an lz4 object), random (stored raw), and
#: mixed: text with every fifth page random, the issue's reproduction of the truncate bug.
KINDS = ("zero", "same", "text", "random", "mixed")


def page_of_kind(kind: str, rng: random.Random, number: int = 0) -> bytes:
    """Page `number` of a file of the given kind."""
    if kind == "mixed":
        kind = "random" if number % 5 == 4 else "text"
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "same":
        return rng.randbytes(8) * (PAGE_SIZE // 8)
    if kind == "text":
        words = [b"alpha", b"beta", b"gamma", b"delta", bytes([rng.randrange(256)])]
        return b" ".join(rng.choice(words) for _ in range(PAGE_SIZE))[:PAGE_SIZE]
    return rng.randbytes(PAGE_SIZE)  # "random": stored raw
