"""The compiled hot path: C extension modules built by the ordinary `pip install`.

Everything else is in pyproject.toml. Each module is optional twice over: it is built only once
its source exists, and a failed build (no compiler, no liblz4 or libzstd) leaves the pure-Python
engine, which the package falls back to and says so (see zfs_ram.native).
"""

from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent

#: module name -> (C sources relative to this file, libraries it links)
NATIVE_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "zfs_ram._codec": (["zfs_ram/_codec.c"], ["lz4", "zstd"]),
    "zfs_ram.pool._zsmalloc": (["zfs_ram/pool/_zsmalloc.c"], []),
}


def native_extensions() -> list[Extension]:
    extensions = []
    for name, (sources, libraries) in NATIVE_MODULES.items():
        if all((HERE / source).exists() for source in sources):
            extensions.append(
                Extension(
                    name,
                    sources,
                    libraries=libraries,
                    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit"],
                    optional=True,
                )
            )
    return extensions


setup(ext_modules=native_extensions())
