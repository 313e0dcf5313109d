"""Probe a video or image: frame count, fps, duration, size, codec, display rotation.

Videos are opened with PyAV for the container header, a demux of every packet (the frame count, and
the check that no frame the header lists is missing or cut short: truncated files are rejected) and a
decode of the first frame (its display rotation); only then are they handed to decord (a guard so
corrupt bytes never reach decord, which dumps them to stderr), which must decode the first and last
frame, with PyAV as the fallback; images with Pillow. Anything undecodable raises
:class:`MediaError` with a human-readable reason.

Rotation: a display matrix turning the picture by a multiple of 90 degrees is applied, as decord and
the FFmpeg command line do, so ``width``/``height`` are the upright sizes and ``rotation`` records
the counter-clockwise turn (vdm.data.decode serves upright frames with both backends). Other angles
are ignored, as decord ignores them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from vdm.data.formats import IMAGE_EXTS, VIDEO_EXTS, normalize_ext

log = logging.getLogger(__name__)

Source = Path | bytes

# container family by extension, and the leading bytes that identify each family
_EXT_FAMILY: dict[str, str] = {
    "mp4": "isobmff", "mov": "isobmff", "webm": "matroska", "mkv": "matroska", "avi": "avi",
    "jpg": "jpeg", "png": "png", "webp": "webp",
}
_ISOBMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_VIDEO_FAMILIES = frozenset({"isobmff", "matroska", "avi"})
_FAMILY_LABEL = {"isobmff": "mp4/mov", "matroska": "mkv/webm", "avi": "avi"}
_IMAGE_FAMILIES = frozenset({"jpeg", "png", "webp"})
_fallback_logged: list[bool] = [False]


class MediaError(ValueError):
    """A file that cannot be used as media; ``str(err)`` is the human-readable reason."""


@dataclass(frozen=True)
class MediaInfo:
    """What a probe found.

    kind: "video" | "image"; frames >= 1 (1 for images); fps > 0 for videos (0.0 for images, the
    average rate for variable frame rate videos); duration in seconds (frames / fps; 0.0 for images);
    width/height: upright (after rotation); codec: decoder name (e.g. "h264", "png"); backend: what
    decoded it, "decord" | "pyav" | "pillow"; rotation: counter-clockwise display turn applied, in
    0, 90, 180, 270.
    """

    kind: str
    frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str
    backend: str
    rotation: int = 0


def sniff_family(head: bytes) -> str | None:
    """Container family from the first bytes: "isobmff", "matroska", "avi", "jpeg", "png", "webp" or None."""
    if head[4:8] in _ISOBMFF_BOXES:
        return "isobmff"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def ext_family(ext: str) -> str | None:
    """Container family of a file extension ("mkv" -> "matroska"), None if not a media extension."""
    return _EXT_FAMILY.get(normalize_ext(ext))


def probe_media(source: Source, ext: str | None = None) -> MediaInfo:
    """Probe a media file given as a path or as in-memory bytes.

    ``ext`` (e.g. "mp4", ".PNG") overrides the path suffix; for bytes without ``ext`` the kind is
    sniffed from the signature. Raises MediaError (empty, truncated, wrong magic, no video stream,
    zero frames, unsupported extension, missing file).
    """
    if isinstance(source, Path) and not source.is_file():
        raise MediaError("missing file")
    head = _read_head(source)
    if not head:
        raise MediaError("empty file")
    family = sniff_family(head)
    if ext is None and isinstance(source, Path):
        ext = source.suffix
    if ext:
        ext = normalize_ext(ext)
        if ext not in VIDEO_EXTS and ext not in IMAGE_EXTS:
            raise MediaError(f"unsupported extension .{ext}")
        expected = _VIDEO_FAMILIES if ext in VIDEO_EXTS else _IMAGE_FAMILIES
        if family not in expected:
            found = f"{family} data" if family else f"unknown signature {head[:8].hex()}"
            raise MediaError(f"wrong magic: not a valid .{ext} file ({found})")
    elif family is None:
        raise MediaError(f"wrong magic: unknown signature {head[:8].hex()}")
    if family in _IMAGE_FAMILIES:
        return _probe_image(source)
    return _probe_video(source, family)


def _read_head(source: Source, size: int = 16) -> bytes:
    if isinstance(source, bytes):
        return source[:size]
    with source.open("rb") as f:
        return f.read(size)


def _open_arg(source: Source) -> str | io.BytesIO:
    return str(source) if isinstance(source, Path) else io.BytesIO(source)


def _probe_image(source: Source) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_open_arg(source)) as im:
            im.load()
            width, height = im.size
            codec = (im.format or "unknown").lower()
    except UnidentifiedImageError:
        raise MediaError("corrupt image: cannot identify image data") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"truncated or corrupt image: {err}") from None
    if width < 1 or height < 1:
        raise MediaError("image has zero size")
    return MediaInfo("image", 1, 0.0, 0.0, width, height, codec, "pillow")


@dataclass(frozen=True)
class _Header:
    codec: str
    width: int
    height: int
    fps: float
    frames: int


def _probe_video(source: Source, family: str) -> MediaInfo:
    header = _read_header(source, family)
    rotation = _first_frame_rotation(source, header)
    width, height = (header.height, header.width) if rotation % 180 else (header.width, header.height)
    try:
        backend = _check_decord(source, header.frames, height, width)
    except _DecordUnusable as why:
        _log_fallback(str(why))
        backend = "pyav"
    duration = header.frames / header.fps
    return MediaInfo("video", header.frames, header.fps, duration, width, height, header.codec, backend,
                     rotation)


def _read_header(source: Source, family: str) -> _Header:
    """Container header via PyAV; the frame count from a demux of every packet, checked against the
    container's own count (fewer packets, or a packet cut short, is a truncated file)."""
    import av

    label = _FAMILY_LABEL[family]
    try:
        with av.open(_open_arg(source)) as container:
            if not container.streams:
                raise MediaError(f"truncated or corrupt {label} file: no streams found")
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(0)
            listed = int(stream.frames or 0)
            frames = 0
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if packet.is_corrupt:
                    raise MediaError(f"truncated or corrupt {label} file: packet {frames} is cut short")
                frames += 1
            header = _Header(ctx.name or "unknown", ctx.width, ctx.height, float(rate), frames)
    except MediaError:
        raise
    except av.error.FFmpegError as err:
        raise MediaError(f"truncated or corrupt {label} file: {_ffmpeg_reason(err)}") from None
    if 0 < frames < listed:
        raise MediaError(f"truncated or corrupt {label} file: {frames} of {listed} frames present")
    if header.frames < 1:
        raise MediaError("video has zero frames")
    if header.width < 1 or header.height < 1:
        raise MediaError("video stream has no frame size")
    if not header.fps > 0:
        raise MediaError("video stream has no frame rate")
    return header


def quarter_turns(rotation: float) -> int:
    """Counter-clockwise display rotation in degrees -> quarter turns 0..3; 0 unless a multiple of 90."""
    turns = round(rotation / 90)
    return turns % 4 if abs(rotation - 90 * turns) < 1.0 else 0


def _first_frame_rotation(source: Source, header: _Header) -> int:
    """Decode the first frame with PyAV (it must decode, at the stream's size); its rotation in degrees."""
    import av

    try:
        with av.open(_open_arg(source)) as container:
            frame = next(container.decode(video=0), None)
    except av.error.FFmpegError as err:
        raise MediaError(f"undecodable video: {_ffmpeg_reason(err)}") from None
    if frame is None:
        raise MediaError("video has no decodable frames")
    if (frame.height, frame.width) != (header.height, header.width):
        got, want = f"{frame.width}x{frame.height}", f"{header.width}x{header.height}"
        raise MediaError(f"decoded frame size {got} differs from the stream's {want}")
    return 90 * quarter_turns(frame.rotation)


def _log_fallback(why: str) -> None:
    """Warn on the first decord fallback in this process, then only at debug level."""
    level = logging.DEBUG if _fallback_logged[0] else logging.WARNING
    _fallback_logged[0] = True
    log.log(level, "decord unusable (%s); falling back to PyAV", why)


def _ffmpeg_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


class _DecordUnusable(Exception):
    """decord could not decode the file or returned frames of the wrong shape."""


def _check_decord(source: Source, frames: int, height: int, width: int) -> str:
    """Decode the first and last frame with decord (which applies the rotation) and validate their
    (height, width, 3) shape."""
    import decord

    last = frames - 1
    try:
        with _quiet_stderr():
            reader = decord.VideoReader(_open_arg(source))
            last = min(last, len(reader) - 1)
            batch = reader.get_batch([0, last] if last > 0 else [0]).asnumpy()
    except (RuntimeError, decord.DECORDError) as err:
        first_line = (str(err).splitlines() or [""])[0]
        reason = re.sub(r"^\[[\d:]+\] \S+: ", "", first_line)[:200]
        raise _DecordUnusable(f"decode error: {reason}") from None
    expected = (batch.shape[0], height, width, 3)
    if batch.shape != expected:
        raise _DecordUnusable(f"frames of shape {batch.shape[1:]} for a {width}x{height} stream")
    return "decord"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (decord's bundled FFmpeg writes corrupt-input diagnostics straight to it)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
