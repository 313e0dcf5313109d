"""Decode video and image bytes into uint8 frames, reading only the frames a clip needs.

Backends: decord (``get_batch`` on the requested indices) or PyAV (sequential decode up to the last
requested index, with a keyframe seek first when the clip starts far into the video; frames are found
by their timestamps, so variable frame rate videos seek correctly). Images decode with Pillow as
one-frame videos. Both backends serve frames upright: decord applies a display matrix rotating by a
multiple of 90 degrees, and PyAV frames are turned the same way (``rotation`` of the first frame,
see vdm.data.probe); ``info`` holds the upright sizes. 10-bit and 4:2:2/4:4:4 streams decode to 8-bit
RGB; the two backends' conversions then agree within a few levels (bit-identical for 8-bit 4:2:0).

decord 0.6.0 returns wrongly shaped frames for some sizes (a 48x32 H.264 video gives 4 channels and
``get_batch`` fails a size check), so its output is validated against ``(T, H, W, 3)`` with H/W taken
from the sample metadata or a PyAV probe of the stream; on a mismatch or a decord error the clip is
decoded again with PyAV (logged once per process). Bytes that carry no known container signature are
rejected before reaching decord, which otherwise echoes the buffer to stderr.

Import order matters: PyAV is imported before decord, because decord's bundled FFmpeg libraries
loaded first break some PyAV codecs (libvpx) in the same process.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import av  # before decord, see module docstring
import numpy as np

from vdm.data.formats import IMAGE_EXTS, VIDEO_EXTS, normalize_ext
from vdm.data.probe import quarter_turns

logger = logging.getLogger(__name__)

Backend = Literal["decord", "pyav"]
BACKENDS: tuple[str, ...] = ("decord", "pyav")
# a clip starting at or after this frame is decoded by PyAV after a keyframe seek instead of from frame 0
SEEK_THRESHOLD = 64
_fallback_logged = False


class DecodeError(RuntimeError):
    """Media bytes that cannot be decoded into the requested frames; the message names what failed."""


@dataclass(frozen=True)
class MediaInfo:
    """Stream properties known before decoding frames (fps is 0.0 for images)."""

    kind: Literal["video", "image"]
    num_frames: int
    fps: float
    height: int
    width: int


def _has_video_signature(data: bytes) -> bool:
    """True when the bytes start like an MP4/MOV, Matroska/WebM, AVI, MPEG-TS (sync bytes 188 apart)
    or FLV file."""
    if len(data) < 12:
        return False
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return True
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML (mkv, webm)
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return True
    return (data[:1] == b"\x47" and data[188:189] == b"\x47") or data[:3] == b"FLV"


def _pyav_frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Frames in the stream: the header count, else the number of non-empty packets (mkv/webm)."""
    if stream.frames > 0:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    container.seek(0)
    return count


class PyAVVideo:
    """A video opened with PyAV; ``read`` decodes only up to the last requested frame, turned upright."""

    def __init__(self, data: bytes, *, threads: bool = True) -> None:
        self._data = data
        try:
            self._container = av.open(io.BytesIO(data))
        except Exception as exc:  # PyAV raises several error types for bad input
            raise DecodeError(f"PyAV could not open the video: {type(exc).__name__}: {exc}") from exc
        self._pts: list[int] | None = None  # presentation timestamps in frame order, [] when unusable
        self._pending: Iterator[av.VideoFrame] | None = None  # a decoder still at frame 0
        try:
            self._stream, self.info = self._probe(threads)
        except Exception as exc:
            self._container.close()
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError(f"PyAV could not read the video stream: {type(exc).__name__}: {exc}") from exc

    def _probe(self, threads: bool) -> tuple[av.video.stream.VideoStream, MediaInfo]:
        if not self._container.streams.video:
            raise DecodeError("no video stream in the container")
        stream = self._container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        ctx = stream.codec_context
        frames = _pyav_frame_count(self._container, stream)
        # the first frame carries the display rotation; its decoder stays ready for a read from frame 0
        decoder = self._container.decode(stream)
        first = next(decoder, None)
        if first is None:
            raise DecodeError("PyAV decoded no frame from the video stream")
        self._pending = itertools.chain([first], decoder)
        self.turns = quarter_turns(first.rotation)
        height, width = (ctx.width, ctx.height) if self.turns % 2 else (ctx.height, ctx.width)
        info = MediaInfo("video", frames, float(rate) if rate else 0.0, height, width)
        if info.num_frames <= 0 or info.height <= 0 or info.width <= 0:
            raise DecodeError(f"PyAV found an empty video stream ({info})")
        return stream, info

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB frames; indices may repeat and come in any order."""
        wanted = sorted(set(int(i) for i in indices))
        _check_indices(wanted, self.info.num_frames)
        try:
            got = self._decode_seek(wanted) if wanted[0] >= SEEK_THRESHOLD else None
            if got is None:
                got = self._decode_from_start(wanted)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(
                f"PyAV failed decoding frames {wanted[:4]}...: {type(exc).__name__}: {exc}"
            ) from exc
        missing = [i for i in wanted if i not in got]
        if missing:
            raise DecodeError(
                f"stream ended before frame {missing[0]} (header says {self.info.num_frames} frames)"
            )
        frames = np.stack([got[int(i)] for i in indices])
        return np.ascontiguousarray(np.rot90(frames, self.turns, axes=(1, 2))) if self.turns else frames

    def _decode_from_start(self, wanted: list[int]) -> dict[int, np.ndarray]:
        frames, self._pending = self._pending, None
        if frames is None:
            self._container.seek(0)
            frames = self._container.decode(self._stream)
        need, last, got = set(wanted), wanted[-1], {}
        for index, frame in enumerate(frames):
            if index in need:
                got[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
        return got

    def _frame_pts(self) -> list[int] | None:
        """Presentation timestamps of the frames in order (from a demux, no decoding); None if unusable."""
        if self._pts is None:
            self._pending = None
            self._container.seek(0)
            pts = [p.pts for p in self._container.demux(self._stream) if p.size]
            usable = None not in pts and len(set(pts)) == len(pts) == self.info.num_frames
            self._pts = sorted(pts) if usable else []
        return self._pts or None

    def timestamps(self) -> np.ndarray | None:
        """(num_frames,) float64 presentation times in seconds from the first frame; None if unknown."""
        pts, tb = self._frame_pts(), self._stream.time_base
        if pts is None or tb is None:
            return None
        return (np.asarray(pts, dtype=np.float64) - pts[0]) * float(tb)

    def _decode_seek(self, wanted: list[int]) -> dict[int, np.ndarray] | None:
        """Seek to the keyframe before the first wanted frame; None when timestamps are unusable."""
        pts = self._frame_pts()
        if pts is None:
            return None
        index_of = {p: i for i, p in enumerate(pts)}
        self._container.seek(pts[wanted[0]], stream=self._stream, backward=True, any_frame=False)
        need, last, got = set(wanted), wanted[-1], {}
        for frame in self._container.decode(self._stream):
            index = index_of.get(frame.pts)
            if index is None:
                return None
            if index > wanted[0] and not got and index not in need:
                return None  # landed after the first wanted frame: fall back to decoding from the start
            if index in need:
                got[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
        return got

    def close(self) -> None:
        self._pending = None
        self._container.close()


class DecordVideo:
    """A video opened with decord; output shape is validated and PyAV takes over when it is wrong."""

    def __init__(
        self, data: bytes, *, size_hint: tuple[int, int] | None = None, num_threads: int = 1
    ) -> None:
        import decord  # after PyAV, see module docstring

        self._data = data
        try:
            self._reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads)
            num_frames, fps = len(self._reader), float(self._reader.get_avg_fps())
        except Exception as exc:  # decord raises RuntimeError or DECORDError
            raise DecodeError(f"decord could not open the video: {type(exc).__name__}: {exc}") from exc
        if size_hint is None:
            probe = PyAVVideo(data, threads=False)
            size_hint = (probe.info.height, probe.info.width)
            probe.close()
        self.info = MediaInfo("video", num_frames, fps, int(size_hint[0]), int(size_hint[1]))
        self._fallback: PyAVVideo | None = None

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB frames; falls back to PyAV on a decord error or bad shape."""
        _check_indices(indices, self.info.num_frames)
        if self._fallback is None:
            expected = (len(indices), self.info.height, self.info.width, 3)
            try:
                frames = self._reader.get_batch(list(indices)).asnumpy()
                if frames.shape == expected and frames.dtype == np.uint8:
                    return frames
                problem = f"decord returned {frames.shape} {frames.dtype}, expected {expected} uint8"
            except Exception as exc:
                problem = f"decord failed: {type(exc).__name__}: {str(exc)[:200]}"
            _log_fallback(problem)
            self._fallback = PyAVVideo(self._data)
        return self._fallback.read(indices)

    def timestamps(self) -> np.ndarray | None:
        """(num_frames,) float64 presentation times in seconds from the first frame; None if unknown."""
        try:
            times = self._reader.get_frame_timestamp(list(range(self.info.num_frames)))[:, 0]
        except Exception:  # decord raises several error types; the caller then uses the average rate
            return None
        return np.asarray(times, dtype=np.float64) - float(times[0])

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()


class ImageMedia:
    """An image decoded with Pillow, served as a one-frame RGB video."""

    def __init__(self, data: bytes) -> None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                self._frame = np.array(img.convert("RGB"))
        except Exception as exc:
            raise DecodeError(f"Pillow could not decode the image: {type(exc).__name__}: {exc}") from exc
        self.info = MediaInfo("image", 1, 0.0, self._frame.shape[0], self._frame.shape[1])

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8; every index must be 0."""
        _check_indices(indices, 1)
        return np.repeat(self._frame[None], len(indices), axis=0)

    def timestamps(self) -> np.ndarray | None:
        return None

    def close(self) -> None:
        return None


Media = PyAVVideo | DecordVideo | ImageMedia


def _check_indices(indices: Sequence[int], num_frames: int) -> None:
    if len(indices) == 0:
        raise DecodeError("no frame indices requested")
    low, high = min(indices), max(indices)
    if low < 0 or high >= num_frames:
        raise DecodeError(f"frame indices {low}..{high} out of range for a {num_frames}-frame video")


def _log_fallback(problem: str) -> None:
    global _fallback_logged
    if not _fallback_logged:
        logger.warning("decord output rejected (%s); decoding with PyAV instead (logged once)", problem)
        _fallback_logged = True
    else:
        logger.debug("decord output rejected (%s); decoding with PyAV", problem)


def open_media(
    data: bytes,
    ext: str,
    *,
    backend: Backend = "decord",
    size_hint: tuple[int, int] | None = None,
    num_threads: int = 1,
) -> Media:
    """Open media bytes of extension ``ext`` (a video container or image type) for frame reads.

    ``size_hint`` is the stream's (height, width) when known (from sample metadata); decord output is
    validated against it. Raises DecodeError naming the extension and backend on bad input.
    """
    ext = normalize_ext(ext)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ext in IMAGE_EXTS:
        return ImageMedia(data)
    if ext not in VIDEO_EXTS:
        raise DecodeError(f"unsupported media extension {ext!r} (videos: {VIDEO_EXTS}, images: {IMAGE_EXTS})")
    if not _has_video_signature(data):
        raise DecodeError(f"{len(data)} bytes of .{ext} carry no known video container signature")
    if backend == "pyav":
        return PyAVVideo(data)
    try:
        return DecordVideo(data, size_hint=size_hint, num_threads=num_threads)
    except DecodeError as decord_error:
        try:
            media = PyAVVideo(data)
        except DecodeError as pyav_error:
            raise DecodeError(f".{ext}: {decord_error}; {pyav_error}") from pyav_error
        _log_fallback(str(decord_error))
        return media


def decode_frames(
    data: bytes,
    ext: str,
    indices: Sequence[int] | None = None,
    *,
    backend: Backend = "decord",
) -> np.ndarray:
    """Decode ``indices`` (all frames when None) of media bytes into (T, H, W, 3) uint8 RGB frames."""
    media = open_media(data, ext, backend=backend)
    try:
        return media.read(range(media.info.num_frames) if indices is None else indices)
    finally:
        media.close()
