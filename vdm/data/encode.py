"""H.264 mp4 encoding with PyAV: numpy frames -> mp4 bytes (corpora, logged samples), and re-encoding."""

from __future__ import annotations

import functools
import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")


@dataclass(frozen=True)
class EncodeOptions:
    """libx264 settings; keyframe_interval bounds the frames between keyframes (short = fast seeking)."""

    keyframe_interval: int = 8
    crf: int = 20
    preset: str = "medium"

    def __post_init__(self) -> None:
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.preset not in X264_PRESETS:
            raise ValueError(f"unknown x264 preset {self.preset!r}; one of {X264_PRESETS}")


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so max(w, h) <= max_side, keeping aspect; both even and >= 2."""
    scale = 1.0
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)

    def even(v: float) -> int:
        return max(2, int(v + 1e-6) // 2 * 2)

    return even(width * scale), even(height * scale)


def encode_frames(frames: np.ndarray | Iterable[np.ndarray], fps: float, options: EncodeOptions) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames (H, W even) to H.264 yuv420p mp4 bytes."""
    frames_iter = iter(frames)
    first = next(frames_iter, None)
    if first is None:
        raise ValueError("cannot encode zero frames")
    height, width = first.shape[:2]
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 frames, got {first.shape} {first.dtype}")
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from frames_iter

    import av

    # convert here rather than inside the encoder: that path gave run-to-run different bitstreams
    frames_yuv = (
        av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p")
        for f in all_frames()
    )
    return _encode(frames_yuv, fps, width, height, options)


def reencode_video(source: Path | bytes, max_side: int | None, options: EncodeOptions) -> bytes:
    """Decode a video with PyAV and re-encode it as H.264 mp4, scaled to fit max_side (even dims).

    A display rotation by a multiple of 90 degrees is applied to the pixels (the output is upright
    with no rotation); any pixel format (10-bit, 4:4:4) becomes 8-bit yuv420p; frames are renumbered
    to a constant rate (the source's average rate).
    """
    import av

    from vdm.data.probe import quarter_turns

    arg = str(source) if isinstance(source, Path) else io.BytesIO(source)
    with av.open(arg) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise ValueError("source has no frame rate")
        width, height = fit_size(stream.codec_context.width, stream.codec_context.height, max_side)
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is None:
            raise ValueError("no frames decoded from source")
        turns = quarter_turns(first.rotation)

        def upright(frame: av.VideoFrame) -> av.VideoFrame:
            if not turns:
                return frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
            turned = np.ascontiguousarray(np.rot90(rgb.to_ndarray(), turns))
            return av.VideoFrame.from_ndarray(turned, format="rgb24").reformat(format="yuv420p")

        frames = (upright(frame) for frame in itertools.chain([first], decoded))
        size = (height, width) if turns % 2 else (width, height)
        return _encode(frames, rate, *size, options)


def _encode(frames: Iterable, fps: float | Fraction, width: int, height: int,
            options: EncodeOptions) -> bytes:
    """Encode av.VideoFrames; pts are renumbered so the output is constant frame rate."""
    import av

    rate = Fraction(fps).limit_denominator(1001 * 1000) if not isinstance(fps, Fraction) else fps
    buf = io.BytesIO()
    count = 0
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = options.keyframe_interval
        # one thread: the bitstream then does not depend on the machine's core count
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(options.crf), "preset": options.preset, **_x264_cpu_options()}
        for frame in frames:
            frame.pts = count
            frame.time_base = 1 / rate
            # decoded intra-only sources (mjpeg) carry pict_type I, which would make every frame a keyframe
            frame.pict_type = av.video.frame.PictureType.NONE
            count += 1
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if count == 0:
        raise ValueError("no frames decoded from source")
    return buf.getvalue()


@functools.cache
def _x264_cpu_options() -> dict[str, str]:
    """Keep x264 off its AVX-512 code paths, which gave run-to-run different bitstreams (measured).

    Every AVX-512 CPU has the AVX2 set, so capping at AVX2 is safe there; elsewhere x264 auto-detects.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            has_avx512 = any(line.startswith("flags") and "avx512" in line for line in f)
    except OSError:
        has_avx512 = False
    return {"x264-params": "asm=AVX2"} if has_avx512 else {}
