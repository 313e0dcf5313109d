"""Probe a video or image: frame count, fps, duration, size, codec.

Videos are opened with PyAV for the container header (cheap, and a guard so corrupt bytes never
reach decord, which dumps them to stderr), decoded with decord first and PyAV as fallback; images
with Pillow. Anything undecodable raises :class:`MediaError` with a human-readable reason.
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
# container frame counts within this tolerance of duration * fps are trusted without counting
_FRAME_COUNT_TOLERANCE = 0.05
_fallback_logged: list[bool] = [False]


class MediaError(ValueError):
    """A file that cannot be used as media; ``str(err)`` is the human-readable reason."""


@dataclass(frozen=True)
class MediaInfo:
    """What a probe found.

    kind: "video" | "image"; frames >= 1 (1 for images); fps > 0 for videos (0.0 for images);
    duration in seconds (frames / fps; 0.0 for images); codec: decoder name (e.g. "h264", "png");
    backend: what decoded it, "decord" | "pyav" | "pillow".
    """

    kind: str
    frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str
    backend: str


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
    try:
        backend = _check_decord(source, header)
    except _DecordUnusable as why:
        _log_fallback(str(why))
        backend = _check_pyav(source, header)
    duration = header.frames / header.fps
    return MediaInfo("video", header.frames, header.fps, duration, header.width, header.height,
                     header.codec, backend)


def _read_header(source: Source, family: str) -> _Header:
    """Container header via PyAV; frame count from the container if sane, else a demux count."""
    import av

    try:
        with av.open(_open_arg(source)) as container:
            if not container.streams:
                raise MediaError(f"truncated or corrupt {_FAMILY_LABEL[family]} file: no streams found")
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(0)
            fps = float(rate)
            duration = None
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000
            frames = int(stream.frames or 0)
            if not _sane_count(frames, duration, fps):
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            header = _Header(ctx.name or "unknown", ctx.width, ctx.height, fps, frames)
    except MediaError:
        raise
    except av.error.FFmpegError as err:
        label = _FAMILY_LABEL[family]
        raise MediaError(f"truncated or corrupt {label} file: {_ffmpeg_reason(err)}") from None
    if header.frames < 1:
        raise MediaError("video has zero frames")
    if header.width < 1 or header.height < 1:
        raise MediaError("video stream has no frame size")
    if not header.fps > 0:
        raise MediaError("video stream has no frame rate")
    return header


def _log_fallback(why: str) -> None:
    """Warn on the first decord fallback in this process, then only at debug level."""
    level = logging.DEBUG if _fallback_logged[0] else logging.WARNING
    _fallback_logged[0] = True
    log.log(level, "decord unusable (%s); falling back to PyAV", why)


def _sane_count(frames: int, duration: float | None, fps: float) -> bool:
    if frames < 1:
        return False
    if duration is None or fps <= 0:
        return True
    expected = duration * fps
    return abs(frames - expected) <= max(1.0, _FRAME_COUNT_TOLERANCE * frames)


def _ffmpeg_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


class _DecordUnusable(Exception):
    """decord could not decode the file or returned frames of the wrong shape."""


def _check_decord(source: Source, header: _Header) -> str:
    """Decode the first and last frame with decord and validate their (H, W, 3) shape."""
    import decord

    last = header.frames - 1
    try:
        with _quiet_stderr():
            reader = decord.VideoReader(_open_arg(source))
            last = min(last, len(reader) - 1)
            batch = reader.get_batch([0, last] if last > 0 else [0]).asnumpy()
    except (RuntimeError, decord.DECORDError) as err:
        first_line = (str(err).splitlines() or [""])[0]
        reason = re.sub(r"^\[[\d:]+\] \S+: ", "", first_line)[:200]
        raise _DecordUnusable(f"decode error: {reason}") from None
    expected = (batch.shape[0], header.height, header.width, 3)
    if batch.shape != expected:
        size = f"{header.width}x{header.height}"
        raise _DecordUnusable(f"frames of shape {batch.shape[1:]} for a {size} stream")
    return "decord"


def _check_pyav(source: Source, header: _Header) -> str:
    """Decode the first frame with PyAV."""
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
    return "pyav"


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
