"""SHA-256 of files, streamed (weights of many GB never sit in memory at once)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def _update(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of one file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    _update(digest, Path(path))
    return digest.hexdigest()


def sha256_files(files: Iterable[tuple[str, str | Path]]) -> str:
    """Hex SHA-256 over named files, in the given order: each name (NUL-terminated) then the file's bytes.

    The names are the caller's (e.g. paths relative to a folder), so renaming or moving a file changes the
    hash while copying the whole set elsewhere does not.
    """
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode("utf-8") + b"\0")
        _update(digest, Path(path))
    return digest.hexdigest()
