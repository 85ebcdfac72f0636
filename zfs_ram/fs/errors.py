"""The one error the layers under the FUSE handlers raise: a request refused with an errno.

The namespace and the control directory are synchronous and know nothing of pyfuse3; they raise
FsError, and the FUSE layer answers it with the same errno. Anything else that escapes a handler
is a bug, answered EIO and logged.
"""

from __future__ import annotations

import os


class FsError(Exception):
    """A refusal: the request changes nothing and is answered with ``errno``."""

    __slots__ = ("errno",)

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.errno = code
