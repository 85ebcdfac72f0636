"""The namespace on its own (no pyfuse3, no mount): random sequences of name operations, with
the tree's invariants checked after every step and every refused step checked to change nothing.
"""

from __future__ import annotations

import errno
import stat
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.errors import FsError
from zfs_ram.fs.namespace import ROOT_INODE, Namespace, Reserved
from zfs_ram.pagestore import PageStore
from zfs_ram.pool import create_pool

RESERVED = Reserved(b".ctl", 2)
# Few names, so that operations collide often; the reserved name, dots and a name too long.
NAMES = st.sampled_from([b"a", b"b", b"c", b"a", b"b", b".ctl", b".", b"..", b"x" * 256])
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def new_namespace(nr_inodes: int = 0) -> Namespace:
    store = PageStore(create_pool("zsmalloc"))
    return Namespace(store, FsConfig(nr_inodes=nr_inodes), reserved=RESERVED, first_ino=16)


def snapshot(ns: Namespace) -> Any:
    """Everything a name operation may change, as plain values."""
    return sorted(
        (
            ino,
            node.mode,
            node.nlink,
            node.lookups,
            node.opens,
            node.mtime_ns,
            node.ctime_ns,
            None if node.dir is None else (node.dir.parent, sorted(node.dir.entries.items())),
        )
        for ino, node in ns.inodes.items()
    )


class NamespaceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ns = new_namespace(nr_inodes=24)
        self.refusals: dict[int, int] = {}

    def directories(self) -> list[int]:
        return sorted(ino for ino, node in self.ns.inodes.items() if node.dir is not None)

    def attempt(self, action: Any) -> None:
        """Run a name operation; a refusal must leave everything as it was."""
        before = snapshot(self.ns)
        try:
            action()
        except FsError as refusal:
            self.refusals[refusal.errno] = self.refusals.get(refusal.errno, 0) + 1
            assert snapshot(self.ns) == before, f"refused ({errno.errorcode[refusal.errno]})"

    def pick(self, data: st.DataObject, choices: list[int]) -> int:
        return data.draw(st.sampled_from(choices + [RESERVED.ino, 999]))

    @rule(data=st.data(), name=NAMES, is_dir=st.booleans())
    def create(self, data: st.DataObject, name: bytes, is_dir: bool) -> None:
        parent = self.pick(data, self.directories())
        self.attempt(lambda: self.ns.create(parent, name, DIR if is_dir else FILE, 1, 1))

    @rule(data=st.data(), name=NAMES)
    def link(self, data: st.DataObject, name: bytes) -> None:
        ino = self.pick(data, sorted(self.ns.inodes))
        parent = self.pick(data, self.directories())
        self.attempt(lambda: self.ns.link(ino, parent, name))

    @rule(data=st.data(), name=NAMES)
    def unlink(self, data: st.DataObject, name: bytes) -> None:
        parent = self.pick(data, self.directories())
        self.attempt(lambda: self.ns.unlink(parent, name))

    @rule(data=st.data(), name=NAMES)
    def rmdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.pick(data, self.directories())
        self.attempt(lambda: self.ns.rmdir(parent, name))

    @rule(data=st.data(), old=NAMES, new=NAMES, flag=st.sampled_from(["", "noreplace", "exchange"]))
    def rename(self, data: st.DataObject, old: bytes, new: bytes, flag: str) -> None:
        old_parent = self.pick(data, self.directories())
        new_parent = self.pick(data, self.directories())
        self.attempt(
            lambda: self.ns.rename(
                old_parent,
                old,
                new_parent,
                new,
                noreplace=flag == "noreplace",
                exchange=flag == "exchange",
            )
        )

    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        ino = data.draw(st.sampled_from(sorted(self.ns.inodes)))
        self.ns.forget(ino, data.draw(st.integers(1, 3)))

    @invariant()
    def the_tree_is_consistent(self) -> None:
        inodes = self.ns.inodes
        names: dict[int, int] = {}
        for ino, node in inodes.items():
            if node.dir is None:
                continue
            assert node.dir.parent in inodes
            subdirs = 0
            for name, child in node.dir.entries.items():
                assert child in inodes, f"{name!r} in {ino} points at a freed inode"
                assert name not in (b".", b"..") and len(name) <= 255
                assert not (ino == ROOT_INODE and name == RESERVED.name)
                names[child] = names.get(child, 0) + 1
                if inodes[child].dir is not None:
                    assert inodes[child].dir.parent == ino  # type: ignore[union-attr]
                    subdirs += 1
            if node.nlink:
                assert node.nlink == 2 + subdirs, f"directory {ino}"
        for ino, node in inodes.items():
            if node.dir is None:
                assert node.nlink == names.get(ino, 0), f"file {ino}"
            elif ino != ROOT_INODE:
                assert names.get(ino, 0) == (1 if node.nlink else 0)
            if not (node.nlink or node.opens or node.lookups or ino == ROOT_INODE):
                raise AssertionError(f"inode {ino} is unreachable but kept")
        reachable = {ROOT_INODE}
        frontier = [ROOT_INODE]
        while frontier:
            directory = inodes[frontier.pop()].dir
            for child in directory.entries.values() if directory is not None else ():
                if child not in reachable:
                    reachable.add(child)
                    frontier.append(child)
        linked = {ino for ino, node in inodes.items() if node.nlink}
        assert linked == reachable, f"named but not reachable from /: {linked - reachable}"


NamespaceMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
test_namespace_model = NamespaceMachine.TestCase


def test_a_refused_rename_of_a_directory_into_itself_changes_nothing() -> None:
    ns = new_namespace()
    outer = ns.create(ROOT_INODE, b"outer", DIR, 1, 1)
    inner = ns.create(outer.ino, b"inner", DIR, 1, 1)
    before = snapshot(ns)
    with pytest.raises(FsError) as refused:
        ns.rename(ROOT_INODE, b"outer", inner.ino, b"moved")
    assert refused.value.errno == errno.EINVAL
    assert snapshot(ns) == before


def test_the_reserved_name_cannot_be_made_removed_or_renamed() -> None:
    ns = new_namespace()
    ns.create(ROOT_INODE, b"f", FILE, 1, 1)
    cases = [
        (lambda: ns.create(ROOT_INODE, RESERVED.name, FILE, 1, 1), errno.EEXIST),
        (lambda: ns.link(16, ROOT_INODE, RESERVED.name), errno.EEXIST),
        (lambda: ns.unlink(ROOT_INODE, RESERVED.name), errno.EPERM),
        (lambda: ns.rmdir(ROOT_INODE, RESERVED.name), errno.EBUSY),
        (lambda: ns.rename(ROOT_INODE, RESERVED.name, ROOT_INODE, b"g"), errno.EBUSY),
        (lambda: ns.rename(ROOT_INODE, b"f", ROOT_INODE, RESERVED.name), errno.EBUSY),
        (lambda: ns.create(RESERVED.ino, b"new", FILE, 1, 1), errno.EPERM),
        (lambda: ns.link(RESERVED.ino, ROOT_INODE, b"h"), errno.EPERM),
    ]
    before = snapshot(ns)
    for action, code in cases:
        with pytest.raises(FsError) as refused:
            action()
        assert refused.value.errno == code
    assert snapshot(ns) == before
    assert ns.lookup(ROOT_INODE, RESERVED.name) == RESERVED.ino
    assert snapshot(ns) == before  # the reserved name is not counted as a lookup


def test_an_unlinked_file_stays_until_forgotten_and_frees_its_pages_then() -> None:
    ns = new_namespace()
    node = ns.create(ROOT_INODE, b"f", FILE, 1, 1)
    assert node.data is not None
    ns.store.write(node.data, 0, b"z" * 3 * 4096 + b"tail")
    ns.unlink(ROOT_INODE, b"f")
    assert node.ino in ns.inodes  # the kernel still holds it (lookup count 1)
    assert ns.store.used_pages == 0 and ns.store.stored_pages == 4  # detached, not freed
    ns.opened(node)  # a path walk that ended before the unlink opens it after all
    assert ns.store.used_pages == 4
    ns.closed(node)
    assert ns.store.used_pages == 0 and node.ino in ns.inodes
    ns.forget(node.ino, 1)
    assert node.ino not in ns.inodes
    assert ns.store.stored_pages == 0 and ns.store.detached_pages == 0
