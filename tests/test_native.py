"""The engine choice: ZFS_RAM_ENGINE, and the fallback when a compiled module is missing."""

from __future__ import annotations

import pytest

from zfs_ram import native


def test_python_engine_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENGINE_ENV, "python")
    assert native.load("probe", "zfs_ram.vocabulary") is None
    assert native.engines()["probe"] == native.PYTHON
    assert "ZFS_RAM_ENGINE=python" in native.reasons()["probe"]


def test_a_module_that_was_not_built_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENGINE_ENV, raising=False)
    assert native.load("probe", "zfs_ram._no_such_module") is None
    assert native.engines()["probe"] == native.PYTHON
    assert "not built" in native.reasons()["probe"]


def test_a_built_module_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENGINE_ENV, "Native")
    module = native.load("probe", "zfs_ram.vocabulary")
    assert module is not None and module.PAGE_SIZE == 4096
    assert native.engines()["probe"] == native.NATIVE


def test_an_unknown_engine_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENGINE_ENV, "rust")
    with pytest.raises(ValueError, match="choose 'native' or 'python'"):
        native.wanted()
