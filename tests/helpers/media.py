"""Small media made by the tests themselves: videos encoded with PyAV, images with Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np

# container -> (codec, pix_fmt); every pair encodes with the PyAV wheel's bundled FFmpeg
CODECS: dict[str, tuple[str, str]] = {
    "mp4": ("libx264", "yuv420p"),
    "webm": ("libvpx", "yuv420p"),
    "mkv": ("mpeg4", "yuv420p"),
    "mov": ("mjpeg", "yuvj420p"),
    "avi": ("mpeg4", "yuv420p"),
}


def moving_square_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a bright square sliding over a dark gradient."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 80, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    colour = rng.integers(128, 256, size=3)
    side = max(2, min(height, width) // 4)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        img = base.copy()
        x0 = (t * 2) % max(1, width - side)
        y0 = (t * 1) % max(1, height - side)
        img[y0 : y0 + side, x0 : x0 + side] = colour
        frames[t] = img.astype(np.uint8)
    return frames


def encode_video(
    frames: np.ndarray,
    container: str = "mp4",
    fps: int = 8,
    codec: str | None = None,
    gop: int | None = None,
) -> bytes:
    """Encode (T, H, W, 3) uint8 frames into an in-memory file of the given container."""
    codec_name, pix_fmt = CODECS[container]
    codec_name = codec or codec_name
    buf = io.BytesIO()
    fmt = {"mkv": "matroska", "mov": "mov"}.get(container, container)
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec_name, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_video(
    path: Path,
    num_frames: int = 12,
    height: int = 32,
    width: int = 48,
    fps: int = 8,
    seed: int = 0,
    **kwargs,
) -> Path:
    """Write a small test video; the container follows the file suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = moving_square_frames(num_frames, height, width, seed)
    path.write_bytes(encode_video(frames, container=path.suffix.lstrip("."), fps=fps, **kwargs))
    return path


def write_image(path: Path, height: int = 32, width: int = 48, seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(moving_square_frames(1, height, width, seed)[0]).save(path)
    return path


def write_corrupt_files(root: Path) -> dict[str, Path]:
    """Files that look like media by name but cannot be decoded; maps a label to its path."""
    root.mkdir(parents=True, exist_ok=True)
    good = encode_video(moving_square_frames(12, 32, 48), "mp4")
    files = {
        "truncated": root / "truncated.mp4",
        "zeros": root / "zeros.mp4",
        "empty": root / "empty.webm",
        "text": root / "notavideo.mkv",
        "bad_image": root / "broken.png",
    }
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["zeros"].write_bytes(b"\x00" * 4096)
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n")
    files["bad_image"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return files
