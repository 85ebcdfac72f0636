"""The bottom layers stand alone: importing the pool, the codec, the page store and the
vocabulary loads neither trio nor pyfuse3, nor any layer of zfs_ram above them.

Checked in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

BOTTOM = ("zfs_ram.pool", "zfs_ram.codec", "zfs_ram.pagestore", "zfs_ram.vocabulary")
#: Top-level packages and zfs_ram modules that must not be loaded by the bottom layers.
FORBIDDEN = ("trio", "pyfuse3")
ABOVE = ("zfs_ram.fs", "zfs_ram.daemon", "zfs_ram.compactor", "zfs_ram.cli", "zfs_ram.client")

PROBE = """
import json, sys
for name in {bottom!r}:
    __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by_bottom_layers() -> list[str]:
    probe = PROBE.format(bottom=BOTTOM)
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    modules: list[str] = json.loads(result.stdout)
    return modules


def test_the_pool_codec_and_page_store_load_neither_trio_nor_pyfuse3() -> None:
    modules = loaded_by_bottom_layers()
    assert set(BOTTOM) <= set(modules)  # the probe did import them
    bad = [m for m in modules if m.split(".")[0] in FORBIDDEN]
    assert bad == []
    upper = [m for m in modules if any(m == a or m.startswith(a + ".") for a in ABOVE)]
    assert upper == []
