"""The leaf file helpers: atomic writes of files and folders, and streamed SHA-256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vdm.utils.hashing import sha256_file, sha256_files
from vdm.utils.io import atomic_dir, atomic_path, atomic_write, stale_temporaries


def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    atomic_write(path, "old\n")
    atomic_write(path, b"new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "new\n"  # the previous file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_stale_temporaries_are_found_by_name(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"ok")
    (tmp_path / ".last.ckpt.123-abcdef01.tmp").write_bytes(b"half")
    (tmp_path / ".other.ckpt.123-abcdef01.tmp").write_bytes(b"another file's")
    assert [p.name for p in stale_temporaries(path)] == [".last.ckpt.123-abcdef01.tmp"]


def test_atomic_dir_swaps_folders_or_keeps_the_old_one(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    with atomic_dir(root) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (root / "a.txt").read_text() == "1"
    with pytest.raises(ValueError), atomic_dir(root) as tmp:
        (tmp / "a.txt").write_text("2")
        raise ValueError("generation failed")
    assert (root / "a.txt").read_text() == "1"  # the complete old folder stays
    with atomic_dir(root) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in root.iterdir()) == ["b.txt"]  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_sha256_of_a_file_and_of_named_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    b.write_bytes(b"y")
    assert sha256_file(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    both = sha256_files([("a.bin", a), ("b.bin", b)])
    assert both == hashlib.sha256(b"a.bin\0" + a.read_bytes() + b"b.bin\0" + b"y").hexdigest()
    assert sha256_files([("renamed.bin", a), ("b.bin", b)]) != both  # names count
    assert sha256_files([("b.bin", b), ("a.bin", a)]) != both  # and their order
