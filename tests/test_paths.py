"""SafeRoot's memory of resolved names (real folders and symlinks on disk): a remembered answer is
given only while the name still leads to the very same file; anything else is resolved and checked again."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.paths import PathRefused, SafeRoot


@pytest.fixture
def root(tmp_path: Path) -> SafeRoot:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.png").write_bytes(b"secret")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "a.png").write_bytes(b"mine")
    return SafeRoot(tmp_path / "in")


def test_a_resolved_name_is_remembered_and_answered_alike(root: SafeRoot) -> None:
    first = root.resolve("a.png", "sub", must_exist=True)
    assert ("a.png", "sub") in root._known
    assert root.resolve("a.png", "sub", must_exist=True) == first == root.root / "sub" / "a.png"


def test_a_folder_swapped_for_a_symlink_out_is_refused_after_being_remembered(root: SafeRoot) -> None:
    root.resolve("a.png", "sub", must_exist=True)
    os.rename(root.root / "sub", root.root / "old")
    os.symlink(root.root.parent / "outside", root.root / "sub")
    with pytest.raises(PathRefused):
        root.resolve("a.png", "sub", must_exist=True)
    with pytest.raises(PathRefused):
        root.resolve("a.png", "sub")


def test_a_file_swapped_for_a_symlink_out_is_checked_again(root: SafeRoot) -> None:
    root.resolve("sub/a.png")
    target = root.root / "sub" / "a.png"
    os.remove(target)
    os.symlink(root.root.parent / "outside" / "a.png", target)
    with pytest.raises(PathRefused):
        root.resolve("sub/a.png")


def test_a_deleted_or_replaced_file_is_resolved_again(root: SafeRoot) -> None:
    root.resolve("sub/a.png", must_exist=True)
    os.remove(root.root / "sub" / "a.png")
    with pytest.raises(FileNotFoundError):
        root.resolve("sub/a.png", must_exist=True)
    assert root.resolve("sub/a.png") == root.root / "sub" / "a.png"  # not required to exist: same answer
    (root.root / "sub" / "a.png").mkdir()  # a folder by that name is not a file
    with pytest.raises(FileNotFoundError):
        root.resolve("sub/a.png", must_exist=True)


def test_refused_and_malformed_names_are_never_remembered(root: SafeRoot) -> None:
    os.symlink(root.root.parent / "outside" / "a.png", root.root / "link.png")
    for name in ("link.png", "../outside/a.png", "/etc/passwd", "%2e%2e/outside/a.png"):
        for _ in range(2):
            with pytest.raises(PathRefused):
                root.resolve(name)
    assert root._known == {}


def test_the_memory_is_bounded(root: SafeRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SafeRoot, "KNOWN_MAX", 3)
    for i in range(10):
        (root.root / f"{i}.png").write_bytes(b"x")
        root.resolve(f"{i}.png")
        assert len(root._known) <= 3
