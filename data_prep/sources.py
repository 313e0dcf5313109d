"""Input discovery for make_shards: a directory tree with caption sidecars, or a CSV/JSONL manifest.

Directory trees: every file with a media extension is an input; ``name.txt`` / ``name.json`` next to
``name.<ext>`` are its caption sidecars (the JSON ``caption`` or ``text`` field wins over the .txt;
other JSON fields go to meta "extra"). Every other file (any extension that is neither media nor
.txt/.json) is reported as skipped with "unsupported extension"; hidden files and folders (names
starting with ".") and the output folder are ignored.

Captions are kept whole (a text encoder truncates later), with surrounding whitespace stripped; no
sidecar, an empty one or an empty caption field gives the empty caption. Sidecars must be UTF-8 (a
leading byte-order mark is dropped): any other encoding rejects the input with "unreadable caption
sidecar NAME: ..." rather than guess at the text.

Manifests (.csv, .jsonl): columns ``path`` (required; relative paths resolve against the manifest's
folder), ``caption`` (or ``text``), optional ``split`` (train/val; empty = hash split); other columns
go to "extra". Rows without a caption column fall back to sidecars.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdm.data.formats import IMAGE_EXTS, VIDEO_EXTS, normalize_ext

MANIFEST_SUFFIXES = (".csv", ".jsonl")
SIDECAR_EXTS = ("txt", "json")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}

Skip = tuple[str, str]  # (path, reason)


@dataclass(frozen=True)
class SourceItem:
    """One input file: absolute path, name (posix path relative to SRC / as listed), caption, split."""

    path: Path
    name: str
    caption: str = ""
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SidecarError(ValueError):
    """A caption sidecar exists but cannot be read."""


def is_media_ext(ext: str) -> bool:
    """True for a supported video or image extension."""
    ext = ext.lower().lstrip(".")
    return ext in VIDEO_EXTS or ext in IMAGE_EXTS


def discover(src: Path, exclude: Path | None = None) -> tuple[list[SourceItem], list[Skip]]:
    """Inputs from a directory tree or a manifest file, plus the entries rejected up front."""
    if src.is_dir():
        return discover_tree(src, exclude)
    if src.is_file() and src.suffix.lower() in MANIFEST_SUFFIXES:
        return discover_manifest(src)
    if src.is_file():
        raise ValueError(f"{src}: expected a folder or a {'/'.join(MANIFEST_SUFFIXES)} manifest")
    raise FileNotFoundError(f"{src} does not exist")


def discover_tree(root: Path, exclude: Path | None = None) -> tuple[list[SourceItem], list[Skip]]:
    """Walk ``root`` in sorted order; media files become items, other non-sidecar files are skipped."""
    items: list[SourceItem] = []
    skipped: list[Skip] = []
    exclude = exclude.resolve() if exclude is not None else None
    for path in _walk(root, exclude):
        name = path.relative_to(root).as_posix()
        ext = path.suffix.lower().lstrip(".")
        if is_media_ext(ext):
            try:
                caption, extra = read_sidecars(path)
            except SidecarError as err:
                skipped.append((name, str(err)))
                continue
            items.append(SourceItem(path, name, caption, None, extra))
        elif ext not in SIDECAR_EXTS:
            skipped.append((name, f"unsupported extension .{ext}" if ext else "no file extension"))
    return items, skipped


def _walk(root: Path, exclude: Path | None) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        found.extend(here / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_sidecars(media: Path) -> tuple[str, dict[str, Any]]:
    """Caption and extra fields from ``<stem>.json`` (caption/text field) and ``<stem>.txt``."""
    caption = ""
    extra: dict[str, Any] = {}
    txt, js = media.with_suffix(".txt"), media.with_suffix(".json")
    if txt.is_file():
        try:
            caption = txt.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise SidecarError(f"unreadable caption sidecar {txt.name}: {err}") from None
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SidecarError(f"unreadable caption sidecar {js.name}: {err}") from None
        if not isinstance(data, dict):
            raise SidecarError(f"caption sidecar {js.name} is not a JSON object")
        json_caption, extra = split_caption(data)
        caption = json_caption or caption
    return caption, extra


def split_caption(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(caption, remaining fields): caption from "caption", else "text"; non-strings count as absent."""
    extra = dict(record)
    caption = ""
    for field_name in ("caption", "text"):
        value = extra.get(field_name)
        if isinstance(value, str) and value.strip():
            caption = value.strip()
            del extra[field_name]
            break
    return caption, extra


def discover_manifest(manifest: Path) -> tuple[list[SourceItem], list[Skip]]:
    """Items from a CSV or JSONL manifest, in file order."""
    items: list[SourceItem] = []
    skipped: list[Skip] = []
    rows = _read_csv(manifest) if manifest.suffix.lower() == ".csv" else _read_jsonl(manifest)
    for where, row in rows:
        if isinstance(row, str):
            skipped.append((where, row))
            continue
        value = row.get("path")
        if not isinstance(value, str) or not value.strip():
            skipped.append((where, "invalid manifest entry: no 'path'"))
            continue
        item, reason = _manifest_item(manifest.parent, value, row)
        if item is None:
            skipped.append((_posix_name(value), reason))
        else:
            items.append(item)
    return items, skipped


def _read_csv(manifest: Path) -> list[tuple[str, dict[str, Any] | str]]:
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{manifest}: CSV manifest needs a 'path' column, got {reader.fieldnames}")
        return [(f"{manifest.name}:{reader.line_num}", {k: v for k, v in row.items() if k is not None})
                for row in reader]


def _read_jsonl(manifest: Path) -> list[tuple[str, dict[str, Any] | str]]:
    rows: list[tuple[str, dict[str, Any] | str]] = []
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((where, f"invalid manifest line: {err}"))
            continue
        rows.append((where, row if isinstance(row, dict) else "invalid manifest line: not a JSON object"))
    return rows


def _posix_name(value: str) -> str:
    return os.path.normpath(value.strip()).replace(os.sep, "/")


def _manifest_item(base: Path, value: str, row: dict[str, Any]) -> tuple[SourceItem | None, str]:
    """Item for one manifest row (path already validated as a non-empty string), or None and why."""
    value = value.strip()
    name = _posix_name(value)
    path = Path(value) if Path(value).is_absolute() else base / value
    ext = normalize_ext(path.suffix)
    if not is_media_ext(ext):
        return None, f"unsupported extension .{ext}" if ext else "no file extension"
    if not path.is_file():
        return None, "missing file"
    raw_split = str(row.get("split") or "").strip().lower()
    split = _SPLIT_ALIASES.get(raw_split) if raw_split else None
    if raw_split and split is None:
        return None, f"invalid split {raw_split!r} (expected train or val)"
    fields = {k: v for k, v in row.items() if k not in ("path", "split")}
    if "caption" in fields or "text" in fields:
        caption, extra = split_caption(fields)
        extra = {k: v for k, v in extra.items() if k not in ("caption", "text")}
    else:
        try:
            caption, extra = read_sidecars(path)
        except SidecarError as err:
            return None, str(err)
        extra.update(fields)
    return SourceItem(path.resolve(), name, caption, split, extra), ""
