"""Exceptions of the pool layer; every one is a `PoolError` so callers can catch the family."""

from __future__ import annotations


class PoolError(Exception):
    """Base class of every error the pool raises on purpose."""


class PoolFullError(PoolError):
    """An allocation would need a frame beyond `mem_limit_pages` (or the OS refused more memory).

    Raised before anything is changed: every stored object stays intact.
    """


class InvalidSizeError(PoolError, ValueError):
    """An object size outside 1..PAGE_SIZE, or a write longer than the object."""


class InvalidHandleError(PoolError):
    """A handle that is 0, unknown, or already freed."""


class PoolCorruptionError(PoolError):
    """`check()` found the pool's structures inconsistent with each other."""
