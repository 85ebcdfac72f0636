"""Which engine runs the per-page hot path: the compiled modules, or the pure-Python reference.

The C modules (built by setup.py) are used wherever they were built. `ZFS_RAM_ENGINE=python`
in the environment asks for the pure-Python engine everywhere, the reference that tests compare
the compiled one against and the fallback where no compiler was at hand. Every layer that has a
compiled twin asks `load()` here, so the choice and the reason for it live in one place, and the
daemon can log them and stats.json show them (`engines()`).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: The environment variable that chooses the engine: "native" (the default) or "python".
ENGINE_ENV = "ZFS_RAM_ENGINE"
NATIVE = "native"
PYTHON = "python"

#: component -> why it runs the engine it runs, filled by load() (for the daemon's log).
_reasons: dict[str, str] = {}
_engines: dict[str, str] = {}


def wanted() -> str:
    """The engine the environment asks for; an unknown value is an error, not a silent default."""
    value = os.environ.get(ENGINE_ENV, NATIVE).strip().lower() or NATIVE
    if value not in (NATIVE, PYTHON):
        raise ValueError(f"{ENGINE_ENV}={value!r}: choose {NATIVE!r} or {PYTHON!r}")
    return value


def load(component: str, module: str) -> ModuleType | None:
    """The compiled module for `component` ("codec", "pool"), or None if the pure-Python engine
    is to run it: asked for by ZFS_RAM_ENGINE, or the module was not built."""
    if wanted() == PYTHON:
        _record(component, PYTHON, f"{ENGINE_ENV}={PYTHON}")
        return None
    try:
        compiled = importlib.import_module(module)
    except ImportError as error:
        _record(component, PYTHON, f"{module} not built ({error})")
        return None
    _record(component, NATIVE, f"{module} from {compiled.__file__}")
    return compiled


def _record(component: str, engine: str, reason: str) -> None:
    _engines[component] = engine
    _reasons[component] = reason


def engines() -> dict[str, str]:
    """component -> "native" or "python", for every component that has asked so far."""
    return dict(sorted(_engines.items()))


def reasons() -> dict[str, str]:
    """component -> why it runs the engine it runs (one line each, for the daemon's log)."""
    return dict(sorted(_reasons.items()))
